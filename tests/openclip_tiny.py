"""Tiny randomly initialised open_clip architectures for tests, registered through open_clip's public API."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OTHER = {**TINY, "embed_dim": 48}


def register_tiny(folder: Path) -> tuple[str, str]:
    """Register `seesay-tiny` (TINY) and `seesay-tiny48` (OTHER) with open_clip; return their names."""
    import open_clip

    for name, cfg in (("seesay-tiny", TINY), ("seesay-tiny48", OTHER)):
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return "seesay-tiny", "seesay-tiny48"


def tiny_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    """A randomly initialised checkpoint of `arch` (seeded, so reproducible)."""
    import open_clip

    torch.manual_seed(seed)
    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), path)
    return path
