"""An open_clip model cut into a frozen bottom, run once, and a trained top, run every step.

Each tower is cut at a transformer block: the blocks below the cut (and the embeddings) are
frozen, so their output for a training image or caption never changes and is computed once
(and cached on disk by the fine-tuner); the blocks above it, the final norm, the pooling and
the projection run every step. `top=-1` trains the whole tower (its input is then the pixels
or the token ids); the locked image tower (LiT) is all bottom: its input is the final embedding.

The text side caches each caption's token states up to its end-of-text token only: the CLIP
text transformer is causal, so the padding after it never changes what the pooled token sees.
Cutting needs open_clip's ViT image tower and its built-in causal text tower; other towers
train whole or stay locked.
"""
from __future__ import annotations

import re
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.training.config import TrainingError

ALL = -1  # `top` value: the whole tower, embeddings included


def _run_blocks(transformer: nn.Module, blocks, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run `blocks` of an open_clip Transformer on batch-first `x`."""
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)


def _is_vit(model: nn.Module) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(getattr(model, "visual", None), VisionTransformer)


def _has_causal_text(model: nn.Module) -> bool:
    return (hasattr(model, "token_embedding") and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax")


class ImageTower:
    """The image side of `model`: `bottom(pixels)` once per image, `top(bottom output)` every step."""

    def __init__(self, model: nn.Module, top: int, locked: bool) -> None:
        self.model, self.locked = model, locked
        blocks = model.visual.transformer.resblocks if _is_vit(model) else None
        self.layers = len(blocks) if blocks is not None else 0
        if locked:
            self.cut = None
        elif top == ALL:
            self.cut = 0
        elif blocks is None:
            raise TrainingError(f"training the top {top} blocks needs a ViT image tower; "
                                f"{type(model.visual).__name__} trains whole (image top -1) or locked")
        elif not 0 <= top <= self.layers:
            raise TrainingError(f"the image tower has {self.layers} blocks; cannot train the top {top}")
        else:
            self.cut = self.layers - top
        self.full = not locked and top == ALL

    @torch.no_grad()
    def bottom(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels → what `top` takes (the pixels themselves when the whole tower trains)."""
        if self.full:
            return pixels
        if self.locked:
            return self.model.encode_image(pixels)
        v = self.model.visual
        return _run_blocks(v.transformer, v.transformer.resblocks[: self.cut], v._embeds(pixels))

    def top(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) image embeddings, not normalised."""
        if self.full:
            return self.model.encode_image(x)
        if self.locked:
            return x
        v = self.model.visual
        pooled, _ = v._pool(_run_blocks(v.transformer, v.transformer.resblocks[self.cut :], x))
        return pooled @ v.proj if v.proj is not None else pooled

    def part(self, name: str) -> tuple[bool, int | None]:
        """(trained?, blocks from the top: 0 for the head, None for the embeddings) of a `visual.` parameter."""
        if self.locked:
            return False, 0
        match = re.match(r"visual\.transformer\.resblocks\.(\d+)\.", name)
        if match and self.layers:
            block = int(match.group(1))
            return block >= self.cut, self.layers - block
        if self.layers and name.startswith(("visual.proj", "visual.ln_post", "visual.attn_pool")):
            return True, 0
        return self.full, None if self.layers else 0


class TextTower:
    """The text side of `model`: `bottom(tokens)` once per caption (ragged), `top(states, lengths)` every step."""

    def __init__(self, model: nn.Module, top: int) -> None:
        self.model = model
        causal = _has_causal_text(model)
        self.layers = len(model.transformer.resblocks) if causal else 0
        if top == ALL:
            self.cut = 0
        elif not causal:
            raise TrainingError(f"training the top {top} text layers needs open_clip's causal text tower; "
                                "this model's text tower trains whole (text top -1)")
        elif not 0 <= top <= self.layers:
            raise TrainingError(f"the text tower has {self.layers} blocks; cannot train the top {top}")
        else:
            self.cut = self.layers - top
        self.full = top == ALL

    @torch.no_grad()
    def bottom(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Token ids (B, context) → per caption what `top` takes: its ids, or its states up to end-of-text."""
        if self.full:
            return list(tokens)
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        x = _run_blocks(m.transformer, m.transformer.resblocks[: self.cut], x, attn_mask=m.attn_mask)
        ends = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        return [x[i, : int(ends[i]) + 1] for i in range(len(x))]

    def top(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, dim) caption embeddings from padded `x` (ids, or states with their `lengths`), not normalised."""
        if self.full:
            return self.model.encode_text(x)
        m = self.model
        width = x.shape[1]
        x = _run_blocks(m.transformer, m.transformer.resblocks[self.cut :], x, attn_mask=m.attn_mask[:width, :width])
        x = m.ln_final(x)[torch.arange(len(x), device=x.device), lengths - 1]
        proj = m.text_projection
        return x if proj is None else (proj(x) if isinstance(proj, nn.Linear) else x @ proj)

    def part(self, name: str) -> tuple[bool, int | None]:
        """(trained?, blocks from the top: 0 for the head, None for the embeddings) of a text parameter."""
        match = re.match(r"transformer\.resblocks\.(\d+)\.", name)
        if match and self.layers:
            block = int(match.group(1))
            return block >= self.cut, self.layers - block
        if self.layers and name.startswith(("text_projection", "ln_final")):
            return True, 0
        return self.full, None if self.layers else 0


class Towers(nn.Module):
    """Both tops as one module (what DistributedDataParallel wraps): inputs → unit vectors."""

    def __init__(self, model: nn.Module, image: ImageTower, text: TextTower) -> None:
        super().__init__()
        self.model = model
        self.image, self.text = image, text

    def forward(self, image_input: torch.Tensor, text_input: torch.Tensor, lengths: torch.Tensor):
        return F.normalize(self.image.top(image_input), dim=-1), F.normalize(self.text.top(text_input, lengths), dim=-1)


def param_groups(model: nn.Module, image: ImageTower, text: TextTower, lr: float, layer_decay: float,
                 weight_decay: float) -> list[dict]:
    """AdamW groups of the trained parameters (the rest get requires_grad=False).

    Heads (projections, final norms) and the temperature train at `lr`; the k-th block from the
    top at lr × layer_decay^k; a whole tower's embeddings below its lowest block. No weight
    decay on gains, biases and the temperature (open_clip's rule).
    """
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if name == "logit_scale":
            trained, depth = True, 0
        elif name.startswith("visual."):
            trained, depth = image.part(name)
        elif name == "logit_bias":
            trained, depth = False, 0  # sigmoid-loss models' bias: InfoNCE does not use it
        else:
            trained, depth = text.part(name)
        p.requires_grad_(trained)
        if not trained:
            continue
        if depth is None:  # a whole tower's embeddings sit below its lowest block
            depth = (image.layers if name.startswith("visual.") else text.layers) + 1
        decay = not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or name == "logit_scale")
        groups.setdefault((lr * layer_decay**depth, decay), []).append(p)
    return [{"params": ps, "lr": g_lr, "base_lr": g_lr, "weight_decay": weight_decay if decay else 0.0}
            for (g_lr, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]

