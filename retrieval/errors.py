"""Errors that name the thing that was wrong, so the CLI can print one clear line."""
from __future__ import annotations


class SeesayError(Exception):
    """Base class of every error seesay reports to a user."""


class BadImageError(SeesayError):
    """An image file that is missing, unreadable, truncated or not an image."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"bad image {path}: {reason}")
        self.path = path
        self.reason = reason


class BadDataError(SeesayError):
    """A dataset file or row that cannot be read."""


class EncoderError(SeesayError):
    """An encoder spec, model file or checkpoint that cannot be used."""


class IndexMismatchError(SeesayError):
    """An index opened with an encoder or dimension other than the one it was built with."""
