"""Encoder registry: one table of every encoder kind a spec can name, and the loaders.

Specs look like `KIND` or `KIND:ARGS` (e.g. `openclip:ViT-B-32/laion2b_s34b_b79k`). `KINDS`
is the table: for each kind, the module that implements it (imported on first use, so a
bag-of-words run never pays for torch), its class there (what reloads a saved model of that
kind), its factory (what builds one from a spec's ARGS; none for kinds that must be trained
first) and, where it has one, a lighter path for text queries. Adding an encoder is one
module and one row here. A saved directory records its kind and reloads through that row.
`ALIASES` names the shipped model folders (`default`, `fast`): pointing an alias at another
folder is one line.

Other packages add kinds through the `seesay.encoders` entry-point group: the entry's name is
the kind, its value `package.module:Class` names an Encoder subclass, whose classmethod
`from_spec(args)`, if it has one, builds it from a spec. `register` adds a kind at run time.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Callable, Optional

from retrieval.encoders.base import Encoder, TextQueries, read_manifest, verify_weights
from retrieval.errors import EncoderError

Factory = Callable[[str], Encoder]
ENTRY_POINTS = "seesay.encoders"


@dataclass(frozen=True)
class Kind:
    """Where one encoder kind lives: names in `module`, resolved on first use."""

    module: str
    cls: str  # the Encoder subclass that reloads saved models of this kind
    summary: str
    factory: Optional[str] = None  # ARGS → Encoder; None: the kind must be trained first
    text_queries: Optional[str] = None  # (directory) → TextQueries or None: text queries without the whole encoder
    shipped: Optional[str] = None  # (alias, directory, manifest, extras) → Encoder: a shipped folder under an alias


KINDS: dict[str, Kind] = {
    "towers": Kind("retrieval.encoders.towers", "TowersEncoder", text_queries="retrieval.encoders.towers_text:load_text_queries",
                   shipped="shipped", summary="frozen EfficientNet-Lite and sentence-transformers towers with trained heads (train first)"),
    "towers-untrained": Kind("retrieval.encoders.towers", "TowersEncoder", factory="untrained",
                             summary="the towers architecture with untrained heads: speed benchmarks, not search"),
    "zeroshot": Kind("retrieval.encoders.zeroshot", "ZeroShotEncoder", factory="from_spec",
                     summary="ImageNet classes of EfficientNet-Lite0 as MiniLM prompt vectors, no training"),
    "openclip": Kind("retrieval.encoders.openclip", "OpenClipEncoder", factory="from_spec",
                     summary="an open_clip model: openclip:ARCH/TAG or openclip:ARCH/CHECKPOINT_FILE"),
    "openclip-random": Kind("retrieval.encoders.openclip", "OpenClipEncoder", factory="random_weights",
                            summary="an open_clip architecture with random weights: speed benchmarks on any machine"),
    "bow-pmi": Kind("retrieval.encoders.bow", "BowEncoder", summary="bag of words, PMI co-occurrence θ (train first)"),
    "bow-ratio": Kind("retrieval.encoders.bow", "BowEncoder", summary="bag of words, ratio co-occurrence θ (train first)"),
}

# The models shipped as package data, one folder each.
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Alias:
    """A spec that names a shipped model folder (`SHIPPED_MODELS`/folder)."""

    folder: str
    extras: bool  # with what its manifest adds (query bank, zero-shot coordinates); False: its heads alone
    summary: str


ALIASES: dict[str, Alias] = {
    "default": Alias("lite02-mpnet-flickr8k", True, "Lite0 + Lite2 image backbones, the all-mpnet-base-v2 text tower, "
                     "its query bank (hubness correction)"),
    "fast": Alias("towers-flickr8k", True, "Lite0 + MiniLM with its query bank: the default of the previous release, "
                  "about 3x faster to index and 4x faster to embed a query"),
}

# Resolved kinds: (class, factory), filled from KINDS, entry points and `register`.
_RESOLVED: dict[str, tuple[type[Encoder], Optional[Factory]]] = {}


def register(kind: str, cls: type[Encoder], factory: Factory | None = None) -> None:
    """Add (or replace) `kind` at run time: `cls` reloads saved models, `factory` builds one from ARGS."""
    _RESOLVED[kind] = (cls, factory)


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Kinds other installed packages declare (read once, only when a kind is not built in)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def _resolve(kind: str) -> tuple[type[Encoder], Optional[Factory]] | None:
    """(class, factory) of `kind`, importing its module on first use; None for an unknown kind."""
    if kind in _RESOLVED:
        return _RESOLVED[kind]
    entry = KINDS.get(kind)
    if entry is not None:
        module = importlib.import_module(entry.module)
        cls = getattr(module, entry.cls)
        factory = attrgetter(entry.factory)(module) if entry.factory else None
    elif kind in _entry_points():
        try:
            cls = _entry_points()[kind].load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin names itself, not a traceback
            raise EncoderError(f"encoder kind {kind!r} from package entry point {_entry_points()[kind].value}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise EncoderError(f"entry point {kind} = {_entry_points()[kind].value} is not an Encoder subclass")
        factory = getattr(cls, "from_spec", None)
    else:
        return None
    register(kind, cls, factory)
    return _RESOLVED[kind]


def known_kinds() -> list[str]:
    """All kinds that can be named in a spec: aliases, built in, registered, and from entry points."""
    return sorted(set(ALIASES) | set(KINDS) | set(_RESOLVED) | set(_entry_points()))


def load_encoder(spec: str | Path) -> Encoder:
    """Build or load the encoder that `spec` names (a registry spec or a saved directory)."""
    path = Path(spec)
    if path.is_dir():
        return _load_saved(path)
    text = str(spec)
    kind, _, args = text.partition(":")
    if kind in ALIASES:
        if args:
            raise EncoderError(f"the {kind} encoder takes no arguments; use `{kind}`")
        return _load_alias(kind, ALIASES[kind])
    resolved = _resolve(kind)
    if resolved is not None:
        cls, factory = resolved
        if factory is not None:
            return factory(args)
        raise EncoderError(
            f"encoder {kind!r} must be trained first: run `seesay train --encoder {kind} ...` "
            "and pass the saved model directory"
        )
    if any(sep in text for sep in ("/", "\\", ".")) and not path.exists():
        raise EncoderError(f"encoder model {text} does not exist")
    raise EncoderError(f"unknown encoder {text!r}; known kinds: {', '.join(known_kinds())}")


def _load_alias(name: str, alias: Alias) -> Encoder:
    """The shipped model that `name` stands for, its weights verified, through its kind's `shipped` loader."""
    directory = SHIPPED_MODELS / alias.folder
    try:
        manifest = read_manifest(directory)
    except EncoderError as exc:
        raise EncoderError(f"the shipped model `{name}` is missing from {directory}; reinstall seesay") from exc
    entry = KINDS.get(manifest["kind"])
    if entry is None or entry.shipped is None:
        raise EncoderError(f"{directory}: a model of kind {manifest['kind']!r} cannot be shipped under an alias")
    verify_weights(directory, manifest)
    return attrgetter(entry.shipped)(importlib.import_module(entry.module))(name, directory, manifest, alias.extras)


def _load_saved(path: Path) -> Encoder:
    """The encoder saved in `path`, through the class of its recorded kind, its weights verified."""
    manifest = read_manifest(path)
    kind = manifest["kind"]
    resolved = _resolve(kind)
    if resolved is None:
        raise EncoderError(f"{path}: saved encoder of unknown kind {kind!r}")
    cls = resolved[0]
    if manifest.get("version", 1) > cls.version:
        raise EncoderError(
            f"{path}: saved with {kind} format version {manifest['version']}, this seesay reads up to {cls.version}"
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


def load_text_queries(directory: str | Path) -> TextQueries | None:
    """A saved encoder's light path for text queries (no image side, no torch where it can), or None.

    None means: load the whole encoder (`load_encoder`) for text queries too.
    """
    entry = KINDS.get(read_manifest(Path(directory))["kind"])
    if entry is None or entry.text_queries is None:
        return None
    module, _, name = entry.text_queries.partition(":")
    return getattr(importlib.import_module(module), name)(Path(directory))
