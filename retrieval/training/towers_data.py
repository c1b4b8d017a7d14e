"""The `towers` trainer's inputs: each split as the cached outputs of the frozen parts of both towers.

Images: per backbone, the map below the trained top blocks (or the pooled vector when none
train), in one or two views (plain, mirrored); captions: the token states below the trained top
layers (or the sentence embedding). The frozen parts run once; their outputs are cached on disk
(`retrieval.training.features`).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from retrieval.datasets import Dataset
from retrieval.backbones import efficientnet as effnet
from retrieval.training import features as feats
from retrieval.training.data import PairSplit, captioned

log = logging.getLogger(__name__)

IMAGE_CACHE_DEPTH = 4  # the map entering each backbone's last four blocks (Lite0: 192×7×7, Lite2: 208×9×9)


class TowersSplit(PairSplit):
    """Cached features of one dataset split, restricted to images that decoded."""

    def __init__(self, ds: Dataset, cfg: dict, flip: bool | str, cache_dir: Path | None, name: str,
                 device: torch.device, max_captions: int | None = None) -> None:
        records, self.problems = captioned(ds, max_captions)
        paths = [r.image_path for r in records]
        backbones = cfg["image_backbones"]
        maps, bad = [], {}
        for backbone in backbones:
            fmap, backbone_bad = image_views(paths, backbone, effnet.decode_size(backbones), cfg["image_top"], flip,
                                             cache_dir, device)
            maps.append(fmap)
            bad.update(backbone_bad)
        keep = self._keep(records, bad, name)
        self.images = [m[keep] for m in maps]  # per backbone: (N, V, ...)
        self.n_views = int(self.images[0].shape[1])
        self.text_top = cfg["text_top"]
        self.text = feats.text_features(self.captions, cfg["text_model"], cfg["text_top"], cache_dir=cache_dir)

    def image_batch(self, idx, view, device) -> list[torch.Tensor]:
        """One float input per backbone for images `idx` in views `view`."""
        return [m[idx, view].to(device, non_blocking=True).float() for m in self.images]

    def text_batch(self, idx, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inputs of captions `idx` to the text head: sentence embeddings, or padded token states and their mask."""
        if self.text_top == 0:
            return self.text["pooled"][idx].to(device, non_blocking=True), None
        h, mask = feats.pad_tokens(self.text["hidden"], self.text["offsets"], idx)
        return h.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    def pin(self) -> None:
        """Keep the image inputs in pinned memory, for fast asynchronous copies to a GPU."""
        self.images = [m.pin_memory() for m in self.images]


@torch.no_grad()
def split_vectors(heads: torch.nn.Module, split: TowersSplit, device: torch.device,
                  batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors of a split's images (plain view) and of all its captions, on the CPU."""
    heads.eval()
    n = len(split.records)
    img = torch.cat([heads.image(split.image_batch(slice(s, s + batch), 0, device)).float().cpu()
                     for s in range(0, n, batch)])
    txt = []
    for s in range(0, len(split.captions), batch):
        h, mask = split.text_batch(list(range(s, min(s + batch, len(split.captions)))), device)
        txt.append(heads.text(h, mask).float().cpu())
    return img, torch.cat(txt)


def image_views(paths: list, backbone: str, decoded: int, image_top: int, flip: bool | str, cache_dir: Path | None,
                device: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
    """(N, V, ...) cached inputs of one backbone's trained part: the plain view, plus a mirrored one with `flip`.

    flip=True encodes the mirrored images (a second one-off caching pass); flip="maps" mirrors the
    cached maps along their width instead, which costs nothing and approximates it (the
    pretrained networks are close to mirror-equivariant, having been trained on mirrored images).
    """
    depth = max(IMAGE_CACHE_DEPTH, image_top)
    kw = {"cache_dir": cache_dir, "device": device, "backbone": backbone, "decoded": decoded}
    fmap, bad = feats.image_features(paths, depth, flip=False, **kw)
    views = [fmap]
    if flip == "maps":
        views.append(torch.flip(fmap, dims=[3]))
    elif flip:
        views.append(feats.image_features(paths, depth, flip=True, **kw)[0])
    fmap = torch.stack(views, dim=1)
    return _lift_images(fmap, backbone, depth, image_top, cache_dir, device), bad


def _lift_images(fmap: torch.Tensor, backbone: str, depth: int, image_top: int, cache_dir: Path | None,
                 device: torch.device) -> torch.Tensor:
    """Run the frozen blocks between the cache depth and the trained top once (pooled when image_top is 0)."""
    if image_top == depth:
        return fmap
    key = hashlib.sha1(fmap.numpy().tobytes()).hexdigest()[:20]
    path = Path(cache_dir or feats.default_cache_dir()) / f"lift-{backbone}-d{depth}-t{image_top}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out = _run_frozen(fmap, backbone, depth, image_top, device)
    feats.save(out, path)
    log.info(f"  lifted image features to {'pooled' if image_top == 0 else f'depth {image_top}'}")
    return out


def _run_frozen(fmap: torch.Tensor, backbone: str, depth: int, image_top: int, device: torch.device) -> torch.Tensor:
    frozen = effnet.TopBlocks(effnet.load_backbone(backbone, str(device)), depth).eval()
    keep_blocks = depth - image_top
    out = []
    with torch.no_grad():
        for s in range(0, len(fmap), 256):
            x = fmap[s : s + 256]
            shape = x.shape
            x = x.flatten(0, 1).to(device).float()
            for block in frozen.blocks[:keep_blocks]:
                x = block(x)
            if image_top == 0:
                x = frozen.act(frozen.bn1(frozen.conv_head(x))).mean(dim=(2, 3))
                out.append(x.reshape(shape[0], shape[1], -1).cpu())
            else:
                out.append(x.half().reshape(shape[0], shape[1], *x.shape[1:]).cpu())
    return torch.cat(out)
