"""The on-disk image/caption index: metadata in SQL, vectors in FAISS, written atomically."""
from indexer.index import Index
from indexer.ingest import AddReport
from indexer.store import Item

__all__ = ["AddReport", "Index", "Item"]
