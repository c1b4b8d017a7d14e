"""The storage engine: images and captions as rows in SQL and vectors in FAISS, written atomically.

It takes rows and their vectors (`Index.add_vectors`) and never encodes anything: the
encoder's saved folder is kept as an opaque artefact for the layer above (`retrieval`).
"""
from indexer.errors import IndexExistsError, IndexMismatchError, ItemNotFoundError, SeesayError
from indexer.index import Index
from indexer.items import Added, BuiltBy, EncoderInfo, IndexInfo, Item, NewItem

__all__ = [
    "Added", "BuiltBy", "EncoderInfo", "Index", "IndexExistsError", "IndexInfo", "IndexMismatchError", "Item",
    "ItemNotFoundError", "NewItem", "SeesayError",
]
