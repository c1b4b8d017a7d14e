"""Contrastive losses over a batch of matched (image, caption) pairs: row i matches column i."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


def clamp_logit_scale(logit_scale: torch.nn.Parameter) -> None:
    """Keep exp(logit_scale) in [1, 100], as CLIP does after every optimiser step."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def infonce(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    label_smoothing: float = 0.0, image_all: torch.Tensor | None = None, text_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): mean of image→text and text→image cross-entropy.

    `image`/`text` are unit vectors (B, d). With `image_all`/`text_all` (all ranks' features,
    the local rows at `offset`) the local queries are scored against every rank's candidates.
    """
    image_all = image if image_all is None else image_all
    text_all = text if text_all is None else text_all
    scale = logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(len(image), device=image.device) + offset
    i2t = scale * image @ text_all.T
    t2i = scale * text @ image_all.T
    return 0.5 * (
        F.cross_entropy(i2t.float(), labels, label_smoothing=label_smoothing)
        + F.cross_entropy(t2i.float(), labels, label_smoothing=label_smoothing)
    )


def vse_max_violation(
    image: torch.Tensor, text: torch.Tensor, margin: float = 0.2,
    image_all: torch.Tensor | None = None, text_all: torch.Tensor | None = None, offset: int = 0,
) -> torch.Tensor:
    """VSE++ hinge loss with the hardest negative of each query, both ways (Faghri et al. 2018)."""
    image_all = image if image_all is None else image_all
    text_all = text if text_all is None else text_all
    labels = torch.arange(len(image), device=image.device) + offset
    i2t = (image @ text_all.T).float()
    t2i = (text @ image_all.T).float()
    total = 0.0
    for scores in (i2t, t2i):
        positive = scores.gather(1, labels[:, None])
        cost = (margin + scores - positive).clamp(min=0)
        cost = cost.scatter(1, labels[:, None], 0.0)
        total = total + cost.max(dim=1).values.mean()
    return total


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of `x` concatenated (gradients flow through this rank's part) and this rank's offset.

    Without an initialised process group (one process) it returns `x` and 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * len(x)


def global_batch_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, loss: str = "infonce",
                      label_smoothing: float = 0.0, margin: float = 0.2) -> torch.Tensor:
    """The loss of the global batch: every rank scores all ranks' rows, its gradients flow through its own.

    `loss` is "infonce" (with `logit_scale` and `label_smoothing`) or "vse" (the hinge with `margin`).
    """
    image_all, _ = gather_with_grad(image)
    text_all, _ = gather_with_grad(text)
    if loss == "infonce":
        return infonce(image_all, text_all, logit_scale, label_smoothing)
    return vse_max_violation(image_all, text_all, margin)
