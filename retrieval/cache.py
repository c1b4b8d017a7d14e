"""Where seesay keeps what it can recompute: feature caches, label predictions, prompt vectors, thumbnails.

One root for all of them: $SEESAY_CACHE if set, else the platform's user cache folder
(platformdirs: ~/.cache/seesay on Linux, honouring XDG_CACHE_HOME).
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """The root of every seesay cache."""
    return Path(os.environ.get("SEESAY_CACHE") or platformdirs.user_cache_dir("seesay"))


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, e.g. cache_dir("thumbnails", key); not created here."""
    return cache_root().joinpath(*parts)
