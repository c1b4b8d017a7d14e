"""Captions → bags of words: tokenise, lowercase, Snowball-stem, drop stop words, count."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import Stemmer

_TOKEN = re.compile(r"[a-z0-9]+")

STOP_WORDS = frozenset(
    """a an the and or but of in on at to for from by with without into onto over under
    is are was were be been being am it its this that these those there here his her their
    him them they he she we you i my your our as while has have had do does did not no
    some one two three very just up down out off near next""".split()
)


@lru_cache(maxsize=1)
def _stemmer() -> Stemmer.Stemmer:
    return Stemmer.Stemmer("english")


def tokenize(text: str, stem: bool = True, stop_words: bool = True) -> list[str]:
    """Lowercased word tokens of `text`, Snowball-stemmed, stop words removed (each optional)."""
    tokens = _TOKEN.findall(text.lower())
    if stop_words:
        tokens = [t for t in tokens if t not in STOP_WORDS]
    return _stemmer().stemWords(tokens) if stem else tokens


@dataclass
class Vocabulary:
    """Word → column index, built from training captions with a minimum count."""

    words: list[str]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 2) -> "Vocabulary":
        """Keep the words seen at least `min_count` times, most frequent first."""
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.words)

    def presence(self, token_lists: Sequence[Sequence[str]]) -> np.ndarray:
        """(n, |V|) 0/1 matrix: which vocabulary words each caption contains."""
        out = np.zeros((len(token_lists), len(self.words)), dtype=np.float32)
        for row, tokens in enumerate(token_lists):
            cols = [self.index[t] for t in tokens if t in self.index]
            out[row, cols] = 1.0
        return out
