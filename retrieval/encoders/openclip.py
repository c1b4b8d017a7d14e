"""`openclip`: CLIP-style models from open_clip.

Specs:
  openclip:ARCH/PRETRAINED  an open_clip architecture with a named pretrained tag (downloads
                            the weights where the network allows).
  openclip:ARCH@PATH        the architecture with weights from a local checkpoint file.
Saving writes the state dict (open_clip.pt) plus the architecture's config, so a saved
directory reloads without the network, even for a custom architecture (registered with open_clip
through `add_model_config`). A model fine-tuned by `retrieval.training.openclip_finetune` also
records its base checkpoint (spec and sha256) and its training settings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from indexer.files import atomic_path, write_atomic
from retrieval import runtime
from retrieval.cache import cache_dir
from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.encoders.torch_image import TorchImageEncoder
from retrieval.errors import EncoderError

KIND = "openclip"
WEIGHTS = "open_clip.pt"
PROVENANCE = ("base", "train")  # config keys of a fine-tuned model: base checkpoint (spec, sha256), settings


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


def _registered_name(arch: str, model_cfg: dict | None) -> str:
    """The open_clip model name to build `arch` with: `arch` itself when open_clip knows it with
    the same config, else a name registered for `model_cfg` (a custom architecture recorded by a
    saved model) through open_clip's public `add_model_config`, from a config file under seesay's cache.
    """
    import open_clip

    known = open_clip.get_model_config(arch)
    if model_cfg is None:
        if known is None:
            raise EncoderError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        return arch
    model_cfg = json.loads(json.dumps(model_cfg))
    if known is not None and json.loads(json.dumps(known)) == model_cfg:
        return arch
    # Content-addressed, so two saved models that gave one name to different configs never collide.
    digest = hashlib.sha256(json.dumps([arch, model_cfg], sort_keys=True).encode()).hexdigest()[:12]
    name = f"{arch}-seesay-{digest}"
    if open_clip.get_model_config(name) is None:
        path = cache_dir("openclip", "model_configs") / f"{name}.json"
        write_atomic(path, json.dumps(model_cfg, indent=1))
        open_clip.add_model_config(path)
    return name


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the base checkpoint a fine-tuned model records)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# How long to wait for the weights' host to answer before calling it unreachable.
REACH_TIMEOUT_S = 3.0
# Names open_clip looks for in a Hugging Face repo given without a file name.
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_source(arch: str, tag: str) -> tuple[str, bool]:
    """(host the pretrained weights download from, whether they are already in the local cache)."""
    from urllib.parse import urlparse

    from open_clip import pretrained

    cfg = pretrained.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if hub and pretrained.has_hf_hub():
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = hub.rstrip("/").rsplit("/", 1) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = (filename,) if filename else _HUB_FILES
        cached = any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
        return urlparse(constants.ENDPOINT).hostname or "huggingface.co", cached
    url = cfg.get("url", "")
    cached = (Path.home() / ".cache" / "clip" / Path(urlparse(url).path).name).is_file()
    return urlparse(url).hostname or "", cached


def reachable(host: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `host`:443 opens within `timeout` (name lookup included)."""
    import socket
    import threading

    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=probe, daemon=True)  # a hung DNS lookup cannot hold us
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])


class OpenClipEncoder(TorchImageEncoder):
    kind = KIND
    version = 1

    def __init__(self, arch: str, pretrained: str | None = None, checkpoint: str | None = None,
                 model_cfg: dict | None = None, spec: str | None = None, device: torch.device | None = None,
                 provenance: dict | None = None) -> None:
        import open_clip

        self.arch, self.pretrained = arch, pretrained
        name = _registered_name(arch, model_cfg)
        self.model_cfg = json.loads(json.dumps(open_clip.get_model_config(name)))
        self.checkpoint_file: Path | None = None  # the weights file this encoder started from
        if pretrained is not None:
            model, preprocess = self._pretrained(pretrained)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
            if checkpoint is not None:
                self.checkpoint_file = Path(checkpoint).expanduser()
                self._load_checkpoint(model, self.checkpoint_file)
        self.provenance = dict(provenance or {})  # a fine-tuned model's base checkpoint and training settings
        self.device = device or runtime.default_device()
        self.model = model.to(self.device).eval()
        self.image_transform = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self._dim = int(self.model_cfg["embed_dim"])
        self._spec = spec or (f"{KIND}:{arch}/{pretrained}" if pretrained else f"{KIND}:{arch}@{checkpoint}")

    def _pretrained(self, tag: str) -> tuple[torch.nn.Module, Any]:
        """open_clip's model with its named pretrained weights (downloaded once where the network allows)."""
        import open_clip

        known = open_clip.list_pretrained_tags_by_model(self.arch)
        if tag not in known:
            raise EncoderError(
                f"open_clip has no pretrained weights {tag!r} for {self.arch}; "
                f"known tags: {', '.join(known) or 'none'} (or use openclip:{self.arch}@PATH)"
            )
        host, cached = weights_source(self.arch, tag)
        if not cached and not reachable(host):
            raise EncoderError(
                f"open_clip weights {self.arch}/{tag} are not in the local cache and {host or 'their host'} "
                f"cannot be reached (offline?): download the checkpoint where the network allows and use "
                f"openclip:{self.arch}@PATH"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(self.arch, pretrained=tag)
            found = open_clip.download_pretrained(open_clip.get_pretrained_cfg(self.arch, tag))  # cached by now
        except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
            raise EncoderError(
                f"cannot fetch open_clip weights {self.arch}/{tag} (no network access?): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                f"Download the checkpoint where the network allows and use openclip:{self.arch}@PATH"
            ) from exc
        self.checkpoint_file = Path(found) if found else None
        return model, preprocess

    def _load_checkpoint(self, model: torch.nn.Module, path: Path) -> None:
        """open_clip's `load_checkpoint` (it unwraps and converts known layouts), with errors that name the file."""
        import open_clip

        if not path.is_file():
            raise EncoderError(f"open_clip checkpoint {path} does not exist")
        try:
            open_clip.load_checkpoint(model, str(path), strict=True)
        except RuntimeError as exc:
            detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise EncoderError(f"checkpoint {path} does not fit open_clip architecture {self.arch} ({detail}); "
                               "it was saved from another architecture") from exc
        except Exception as exc:  # noqa: BLE001 - unpickling and format errors come in many types
            raise EncoderError(f"{path} is not a readable open_clip checkpoint: {type(exc).__name__}: {exc}") from exc

    def mark_fine_tuned(self, directory: Path, provenance: dict) -> None:
        """Name this encoder by the directory it is about to be saved in, recording its base and training."""
        self._spec = str(Path(directory).resolve())
        self.provenance = dict(provenance)

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
        return {"arch": self.arch, "pretrained": self.pretrained, "model_cfg": self.model_cfg, **self.provenance}

    def save_weights(self, directory: Path) -> None:
        with atomic_path(Path(directory) / WEIGHTS) as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp)

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "OpenClipEncoder":
        path = Path(directory) / WEIGHTS
        if not path.is_file():
            raise EncoderError(f"{directory}: no {WEIGHTS}")
        if "arch" not in config:
            raise EncoderError(f"{directory}: encoder.json config names no open_clip architecture")
        provenance = {k: v for k, v in config.items() if k in PROVENANCE}
        return cls(config["arch"], checkpoint=str(path), model_cfg=config.get("model_cfg"),
                   spec=str(Path(directory).resolve()), provenance=provenance)


def from_spec(args: str) -> Encoder:
    """`openclip:ARCH/TAG` or `openclip:ARCH/CHECKPOINT_FILE`."""
    arch, tag, path = parse_spec(args)
    return OpenClipEncoder(arch, pretrained=tag, checkpoint=path)


def random_weights(args: str) -> Encoder:
    """`openclip-random:ARCH`: the architecture with random weights (speed on any machine, no download)."""
    if not args:
        raise EncoderError("name an open_clip architecture: openclip-random:ViT-B-32")
    return OpenClipEncoder(args, spec=f"openclip-random:{args}")
