"""`openclip`: CLIP-style models from open_clip.

Specs:
  openclip:ARCH/PRETRAINED  an open_clip architecture with a named pretrained tag (downloads
                            the weights where the network allows).
  openclip:ARCH@PATH        the architecture with weights from a local checkpoint file.
Saving writes the state dict (open_clip.pt) plus the architecture's config, so a saved
directory reloads without the network, even for a custom architecture.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from retrieval import runtime
from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.encoders.registry import register
from retrieval.encoders.torch_image import TorchImageEncoder
from retrieval.errors import EncoderError

KIND = "openclip"
WEIGHTS = "open_clip.pt"


def parse_spec(args: str) -> tuple[str, str | None, str | None]:
    """`ARCH/PRETRAINED` or `ARCH@PATH` → (arch, pretrained tag, checkpoint path)."""
    if "@" in args:
        arch, _, path = args.partition("@")
        if not arch or not path:
            raise EncoderError(f"openclip spec must be openclip:ARCH@PATH, got openclip:{args}")
        return arch, None, path
    arch, sep, tag = args.partition("/")
    if not arch or not sep or not tag:
        raise EncoderError(
            f"openclip spec must be openclip:ARCH/PRETRAINED or openclip:ARCH@PATH, got openclip:{args}"
        )
    return arch, tag, None


def _ensure_arch(arch: str, model_cfg: dict | None = None) -> None:
    import open_clip
    from open_clip import factory

    if arch in open_clip.list_models():
        return
    if model_cfg is not None:
        factory._MODEL_CONFIGS[arch] = model_cfg  # a custom architecture recorded by a saved model
        return
    raise EncoderError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")


def _arch_config(arch: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise EncoderError(f"unknown open_clip architecture {arch!r}")
    return json.loads(json.dumps(cfg))


class OpenClipEncoder(TorchImageEncoder):
    kind = KIND
    version = 1

    def __init__(self, arch: str, pretrained: str | None = None, checkpoint: str | None = None,
                 model_cfg: dict | None = None, spec: str | None = None, state: dict | None = None,
                 device: torch.device | None = None) -> None:
        import open_clip

        _ensure_arch(arch, model_cfg)
        self.arch, self.pretrained = arch, pretrained
        self.model_cfg = _arch_config(arch)
        if pretrained is not None:
            known = open_clip.list_pretrained_tags_by_model(arch)
            if pretrained not in known:
                raise EncoderError(
                    f"open_clip has no pretrained weights {pretrained!r} for {arch}; "
                    f"known tags: {', '.join(known) or 'none'} (or use openclip:{arch}@PATH)"
                )
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
            except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
                raise EncoderError(
                    f"cannot fetch open_clip weights {arch}/{pretrained} (no network access?): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                    f"Download the checkpoint where the network allows and use openclip:{arch}@PATH"
                ) from exc
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
            if checkpoint is not None:
                path = Path(checkpoint).expanduser()
                if not path.is_file():
                    raise EncoderError(f"open_clip checkpoint {path} does not exist")
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001
                    raise EncoderError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
                for key in ("state_dict", "model"):
                    if isinstance(state, dict) and isinstance(state.get(key), dict):
                        state = state[key]
                state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
                where = str(path)
            else:
                where = "saved state"
            if state is not None:
                self._load_state(model, state, where)
        self.device = device or runtime.default_device()
        self.model = model.to(self.device).eval()
        self.image_transform = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self._dim = int(self.model_cfg["embed_dim"])
        self._spec = spec or (f"{KIND}:{arch}/{pretrained}" if pretrained else f"{KIND}:{arch}@{checkpoint}")

    def _load_state(self, model: torch.nn.Module, state: dict, where: str) -> None:
        own = model.state_dict()
        mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in state]
        if mismatched or len(missing) > len(own) // 2:
            detail = (f"{mismatched[0]}: checkpoint {tuple(state[mismatched[0]].shape)} vs "
                      f"{tuple(own[mismatched[0]].shape)}") if mismatched else f"{len(missing)} of {len(own)} weights missing"
            raise EncoderError(f"checkpoint {where} does not fit open_clip architecture {self.arch} ({detail}); "
                               "it was saved from another architecture")
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise EncoderError(f"checkpoint {where} does not fit open_clip architecture {self.arch}: {exc}") from exc

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def spec(self) -> str:
        return self._spec

    def image_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.no_grad(), runtime.autocast(self.device):
            for s in range(0, len(texts), batch_size):
                chunk = [str(t) for t in texts[s : s + batch_size]]
                tokens = self.tokenizer(chunk).to(self.device)
                out[s : s + len(chunk)] = self.model.encode_text(tokens).float().cpu().numpy()
        return l2_normalize(out)

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "pretrained": self.pretrained, "model_cfg": self.model_cfg}

    def save_weights(self, directory: Path) -> None:
        from retrieval.encoders.towers import save_state

        save_state(self.model.state_dict(), Path(directory) / WEIGHTS)

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "OpenClipEncoder":
        path = Path(directory) / WEIGHTS
        if not path.is_file():
            raise EncoderError(f"{directory}: no {WEIGHTS}")
        if "arch" not in config:
            raise EncoderError(f"{directory}: encoder.json config names no open_clip architecture")
        return cls(config["arch"], checkpoint=str(path), model_cfg=config.get("model_cfg"),
                   spec=str(Path(directory).resolve()))


def _factory(args: str) -> Encoder:
    arch, tag, path = parse_spec(args)
    return OpenClipEncoder(arch, pretrained=tag, checkpoint=path)


register(KIND, OpenClipEncoder, _factory)
