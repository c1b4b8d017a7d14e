"""The `towers` kind's name, weight file and configuration defaults, without torch.

Both the encoder (`encoders.towers`) and its torch-free text-query path
(`encoders.towers_text`) read a saved model's config over these defaults.
"""
from __future__ import annotations

import math
from typing import Any

from retrieval.backbones.text_models import DEFAULT_TEXT_MODEL

KIND = "towers"
VERSION = 1  # of the saved format
WEIGHTS = "heads.pt"

DEFAULT_CONFIG: dict[str, Any] = {
    "text_model": DEFAULT_TEXT_MODEL,
    "image_backbones": ["lite0"],
    "image_top": 0,
    "text_top": 0,
    "head": "linear",
    "embed_dim": 256,
    "hidden": 1024,
    "dropout": 0.1,
    "image_in": 1280,  # the towers' widths: the encoder sets both from the backbones it loads
    "text_in": 384,
    "init_logit_scale": math.log(1 / 0.07),
    "hubness_tau": None,  # set when the model carries a query bank (querybank.pt)
    "zeroshot_weight": 0.0,  # w > 0: append zero-shot coordinates (see towers._zeroshot_prompts), scores (1 − w)·towers + w·zero-shot
}
