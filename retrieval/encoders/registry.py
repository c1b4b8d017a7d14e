"""Encoder registry: a spec string or a saved directory → an Encoder.

Specs look like `KIND` or `KIND:ARGS` (e.g. `openclip:ViT-B-32/laion2b_s34b_b79k`).
Each encoder module registers a factory for its kind; a path to a directory
holding encoder.json is loaded with the class registered for its recorded kind.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from retrieval.encoders.base import Encoder, TextQueries, read_manifest, verify_weights
from retrieval.errors import EncoderError

Factory = Callable[[str], Encoder]

_FACTORIES: dict[str, Factory] = {}
_CLASSES: dict[str, type[Encoder]] = {}

# Modules that register kinds when imported; imported lazily so that a bag-of-words
# run never pays for torch or open_clip start-up.
_PROVIDERS: dict[str, str] = {
    "bow-pmi": "retrieval.encoders.bow",
    "bow-ratio": "retrieval.encoders.bow",
    "towers": "retrieval.encoders.towers",
    "default": "retrieval.encoders.towers",
    "fast": "retrieval.encoders.towers",
    "zeroshot": "retrieval.encoders.zeroshot",
    "openclip": "retrieval.encoders.openclip",
}


# Kinds whose saved models answer text queries without loading the whole encoder: the module
# whose `load_text_queries(directory)` gives that path (or None where the model needs the encoder).
_TEXT_QUERIES: dict[str, str] = {
    "towers": "retrieval.encoders.towers_text",
}


def register(kind: str, cls: type[Encoder], factory: Factory | None = None) -> None:
    """Register `cls` as the loader of saved `kind` encoders and optionally a spec factory."""
    _CLASSES[kind] = cls
    if factory is not None:
        _FACTORIES[kind] = factory


def add_provider(kind: str, module: str) -> None:
    """Declare that importing `module` registers `kind`."""
    _PROVIDERS[kind] = module


def _ensure(kind: str) -> None:
    if kind not in _CLASSES and kind in _PROVIDERS:
        importlib.import_module(_PROVIDERS[kind])


def known_kinds() -> list[str]:
    """All kinds that can be named in a spec."""
    return sorted(set(_PROVIDERS) | set(_CLASSES))


def load_encoder(spec: str | Path) -> Encoder:
    """Build or load the encoder that `spec` names (a registry spec or a saved directory)."""
    path = Path(spec)
    if path.is_dir():
        manifest = read_manifest(path)
        kind = manifest["kind"]
        _ensure(kind)
        if kind not in _CLASSES:
            raise EncoderError(f"{path}: saved encoder of unknown kind {kind!r}")
        cls = _CLASSES[kind]
        if manifest.get("version", 1) > cls.version:
            raise EncoderError(
                f"{path}: saved with {kind} format version {manifest['version']}, "
                f"this seesay reads up to {cls.version}"
            )
        verify_weights(path, manifest)
        try:
            encoder = cls.from_saved(path, manifest.get("config", {}))
        except EncoderError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch, numpy and json each fail their own way on bad files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(f"{path}: cannot load the saved {kind} encoder ({reason})") from exc
        encoder.digest = manifest.get("digest")
        if encoder.dim != manifest["dim"]:
            raise EncoderError(f"{path}: manifest says dim {manifest['dim']}, weights give {encoder.dim}")
        return encoder
    text = str(spec)
    kind, _, args = text.partition(":")
    _ensure(kind)
    if kind in _FACTORIES:
        return _FACTORIES[kind](args)
    if kind in _CLASSES:
        raise EncoderError(
            f"encoder {kind!r} must be trained first: run `seesay train --encoder {kind} ...` "
            "and pass the saved model directory"
        )
    if any(sep in text for sep in ("/", "\\", ".")) and not path.exists():
        raise EncoderError(f"encoder model {text} does not exist")
    raise EncoderError(f"unknown encoder {text!r}; known kinds: {', '.join(known_kinds())}")


def load_text_queries(directory: str | Path) -> TextQueries | None:
    """A saved encoder's light path for text queries (no image side, no torch where it can), or None.

    None means: load the whole encoder (`load_encoder`) for text queries too.
    """
    module = _TEXT_QUERIES.get(read_manifest(Path(directory))["kind"])
    return None if module is None else importlib.import_module(module).load_text_queries(Path(directory))
