"""Errors of the storage engine; every error seesay reports derives from `SeesayError`.

They live here, in the bottom layer, so that `indexer/` needs nothing from above it;
`retrieval.errors` re-exports them beside the errors of datasets and encoders.
"""
from __future__ import annotations


class SeesayError(Exception):
    """Base class of every error seesay reports to a user."""


class IndexMismatchError(SeesayError):
    """An index opened with an encoder or dimension other than the one it was built with."""


class IndexExistsError(SeesayError):
    """A folder or database that already holds a seesay index (e.g. made by another process meanwhile)."""


class ItemNotFoundError(SeesayError):
    """Item ids that are not in the index."""

    def __init__(self, message: str, ids: list[int]) -> None:
        super().__init__(message)
        self.ids = ids
