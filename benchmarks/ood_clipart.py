"""Build an out-of-domain dev set from Debian's openclipart-png: clip art with one caption each from its file name.

    apt-get download openclipart-png && dpkg-deb -x openclipart-png_*.deb /tmp/openclipart
    python -m benchmarks.ood_clipart --root /tmp/openclipart/usr/share/openclipart/png --out /tmp/ood-clipart
    python -m benchmarks.ood_clipart --out /tmp/ood-clipart --eval default,zeroshot   # or seesay eval --data …

Only object categories are used (animals, food, people, tools, transportation, …; not the
computer icons, shapes, signs or gradients). A file is named `TITLE_AUTHOR_NN.png`, the
author cut short; author words are recognised as words that follow the titles of several
files and begin none, so the caption is the title plus its folder, e.g. "flying wasp, bugs". Titles with no
word left, card faces, duplicate captions and duplicate pictures are dropped; `--n` files are drawn with a fixed
seed and copied (never committed: the set is built where it is used). Not tuxpaint-stamps,
which is reserved for held-out measurement.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.evaluation import Evaluation

CATEGORIES = ("animals", "buildings", "containers", "decorations", "education", "electronics", "food", "office",
              "people", "plants", "recreation", "science", "tools", "transportation")
SKIP_FOLDERS = {"cards"}
# Words that may follow a title's first word without being an author's name.
TITLE_WORDS = {"a", "an", "and", "at", "in", "of", "on", "the", "to", "with", "for", "from", "by", "or", "-", "s"}
AUTHOR_MIN_FILES = 3


def words(stem: str) -> list[str]:
    """A file stem split on "_", trailing sequence numbers dropped."""
    parts = [p for p in stem.lower().split("_") if p]
    while parts and re.fullmatch(r"\d+|r", parts[-1]):
        parts.pop()
    return parts


def author_words(stems: list[list[str]]) -> set[str]:
    """Words that follow the titles of several files and never begin one: the (cut) names of prolific authors."""
    later = Counter(w for parts in stems for w in set(parts[1:]))
    first = {parts[0] for parts in stems if parts}
    return {w for w, n in later.items()
            if n >= AUTHOR_MIN_FILES and w not in first and w not in TITLE_WORDS and not w.isdigit()}


def title(parts: list[str], authors: set[str]) -> str:
    """The words before the first author word, without digits; "" when none is left."""
    out = []
    for w in parts:
        if out and w in authors:
            break
        w = re.sub(r"\d+", "", w).replace("-", " ").strip(" .")
        if w:
            out.append(w)
    text = " ".join(out)
    return text if re.search(r"[a-z]{3}", text) else ""


def build(root: Path, out: Path, n: int, seed: int = 0) -> int:
    files = sorted(p for c in CATEGORIES for p in (root / c).rglob("*.png") if not SKIP_FOLDERS & set(p.parts))
    stems = [words(p.stem) for p in files]
    authors = author_words(stems)
    pairs, seen = [], set()
    for path, parts in zip(files, stems):
        name = title(parts, authors)
        caption = f"{name}, {path.parent.name.replace('_', ' ')}" if name else ""
        digest = hashlib.sha1(path.read_bytes()).hexdigest()  # the same picture filed in two folders
        if caption and caption not in seen and digest not in seen:
            seen.update((caption, digest))
            pairs.append((path, caption))
    random.Random(seed).shuffle(pairs)
    pairs = sorted(pairs[:n], key=lambda pc: str(pc[0]))
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for path, caption in pairs:
            name = "-".join(path.relative_to(root).parts)
            shutil.copyfile(path, out / "images" / name)
            writer.writerow([name, caption])  # CSV images resolve against images/ beside it
    return len(pairs)


def evaluate_encoders(csv_path: Path, specs: list[str]) -> dict[str, Evaluation]:
    """`seesay eval` of each encoder on the built set (with and without hubness where the encoder has it)."""
    from retrieval.datasets import load_dataset
    from retrieval.encoders import load_encoder
    from retrieval.evaluation import evaluate

    records = load_dataset(csv_path).records
    return {spec: evaluate(load_encoder(spec), records, 32) for spec in specs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="usr/share/openclipart/png of the extracted package (to build the set)")
    p.add_argument("--out", type=Path, required=True, help="the set's folder (captions.csv + images/)")
    p.add_argument("--n", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="", help="comma-separated encoders to evaluate on the set, e.g. default,zeroshot")
    args = p.parse_args(argv)
    if args.root:
        print(f"{build(args.root, args.out, args.n, args.seed)} captioned images in {args.out / 'captions.csv'}")
    for spec, r in evaluate_encoders(args.out / "captions.csv", [s for s in args.eval.split(",") if s]).items():
        rows = [(spec, r)] + ([(f"{spec} without hubness", r.without_hubness)] if r.without_hubness is not None else [])
        for name, x in rows:
            print(f"{name}: {r.n_images} images, i2t R@1 {x.i2t['R@1']:.1f}, t2i R@1 {x.t2i['R@1']:.1f}, RSUM {x.rsum:.1f}")


if __name__ == "__main__":
    main()
