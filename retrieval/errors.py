"""Errors that name the thing that was wrong, so the CLI can print one clear line.

The base class and the index's own errors come from the storage layer (`indexer.errors`).
"""
from __future__ import annotations

from indexer.errors import IndexMismatchError, ItemNotFoundError, SeesayError

__all__ = [
    "BadDataError",
    "BadImageError",
    "BadQueryError",
    "EncoderError",
    "ImageTooLargeError",
    "IndexMismatchError",
    "ItemNotFoundError",
    "SeesayError",
]


class BadImageError(SeesayError):
    """An image file that is missing, unreadable, truncated, not an image, or of a refused shape.

    `summary` says why in seesay's own words; `reason` adds the decoder's detail where there
    is one (for people at a terminal; the server answers with `summary` only).
    """

    def __init__(self, path: object, reason: str, detail: str | None = None) -> None:
        self.path = path
        self.summary = reason
        self.reason = f"{reason} ({detail})" if detail else reason
        super().__init__(f"bad image {path}: {self.reason}")


class ImageTooLargeError(BadImageError):
    """An image with more pixels than allowed, refused before it is decoded."""


class BadQueryError(SeesayError):
    """A search request that cannot be answered as asked (empty text, k out of range, unknown target)."""


class BadDataError(SeesayError):
    """A dataset file or row that cannot be read."""


class EncoderError(SeesayError):
    """An encoder spec, model file or checkpoint that cannot be used."""
