"""Captioned image datasets: one reader interface over the common file layouts."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Iterator

from retrieval.errors import BadDataError


@dataclass
class Record:
    """One image with its captions, as read from a dataset."""

    image_name: str  # the image's name in the dataset (its relative path); the index keeps it as the item's source_id
    image_path: Path
    captions: list[str]
    split: str | None = None


@dataclass
class Dataset:
    """Records read from one source, and the rows that were skipped (each naming the item)."""

    records: list[Record]
    problems: list[str] = field(default_factory=list)


FORMATS = ("csv", "karpathy", "coco", "folder", "jsonl")
# The Flickr8k copy a source checkout is developed against, ../shared/data/flickr8k beside the
# project root: the default data of the benchmarks, the training scripts and the tests.
SHARED_FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
# Pillow formats it can only identify, or decode only with an outside program (Ghostscript).
_IDENTIFY_ONLY_FORMATS = frozenset({"EPS", "MPEG"})
# Karpathy's "restval" images are the extra training images of his COCO split.
_SPLIT_ALIASES = {"train": {"train", "restval"}}
# Longer captions are skipped as bad rows: no caption set has them, and every encoder
# would read them in full before truncating.
MAX_CAPTION_CHARS = 10_000
# Control characters (NUL and the rest of C0/C1) become spaces; tabs and newlines are whitespace anyway.
_CONTROL = {code: " " for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}
# Bytes that are not UTF-8, as Python's surrogateescape decoding keeps them.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def load_dataset(
    path: str | Path,
    images_root: str | Path | None = None,
    split: str | None = None,
    split_file: str | Path | None = None,
    fmt: str | None = None,
    allow_outside_images: bool = False,
) -> Dataset:
    """Read a captioned image dataset, one Record per image, in order of first appearance.

    `fmt` is one of FORMATS; by default it is detected from the path (a folder, .csv,
    .jsonl, or a .json in Karpathy or COCO layout). Relative image names resolve against
    `images_root`, else an `images/` folder beside the dataset file, else the file's folder.
    `split` selects by the Karpathy split field ("train" includes "restval"). `split_file`
    lists image names one a line: it selects those images in its order and labels them
    `split`, or the file's stem. Skipped rows and unknown split names go to `problems`.
    Row formats (csv, jsonl) make a record only for images with a usable caption; image
    formats (karpathy, coco, folder) make one for every image listed, captioned or not.
    Image names that lead outside the images folder (absolute, or through `..`) are skipped
    as problems unless `allow_outside_images`: a captions file from elsewhere must not make
    seesay read (and a server show) any file the user can read.
    """
    path = Path(path)
    if not path.exists():
        raise BadDataError(f"dataset not found: {path}")
    if not (path.is_file() or path.is_dir()):
        raise BadDataError(f"{path} is not a regular file or folder (a FIFO or device is never read)")
    if fmt is not None and fmt not in FORMATS:
        raise BadDataError(f"unknown dataset format {fmt!r} for {path}; expected one of {', '.join(FORMATS)}")
    fmt = fmt or _detect_format(path)
    if (fmt == "folder") != path.is_dir():
        raise BadDataError(f"{path}: the {fmt} format needs a {'folder' if fmt == 'folder' else 'file'}")
    if fmt == "folder" and images_root is not None:
        raise BadDataError(f"{path}: images_root does not apply to a folder of images")

    root = None if images_root is None else Path(images_root)
    fmt, records, problems = _read(path, fmt, root, allow_outside_images)
    if split_file is not None:
        records, split_problems = _apply_split_file(records, Path(split_file), split)
        problems += split_problems
    elif split is not None:
        if fmt != "karpathy":
            raise BadDataError(f"{path}: {fmt} datasets have no split field; pass a split file to select {split!r}")
        records = _select_split(records, split, path)
    return Dataset(records, problems)


@cache
def image_extensions() -> frozenset[str]:
    """File suffixes (lowercase, with the dot) of every image format the installed Pillow decodes."""
    from PIL import Image, ImageFile

    Image.init()
    decodable = {
        name for name, (opener, _accept) in Image.OPEN.items()
        if name not in _IDENTIFY_ONLY_FORMATS and not (isinstance(opener, type) and issubclass(opener, ImageFile.StubImageFile))
    }
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in decodable)


def summarize_problems(problems: list[str], limit: int = 10) -> str:
    """Describe skipped items in a few lines: the count, then the first `limit` of them."""
    if not problems:
        return "no problems"
    head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    if len(problems) > limit:
        head += f"; first {limit}"
    return "\n  ".join([head + ":", *problems[:limit]])


def clean_caption(text: str) -> str:
    """Strip a caption, turn control characters (NUL included) into spaces and collapse runs of whitespace."""
    return " ".join(text.translate(_CONTROL).split())


def bad_image_name(name: str) -> str | None:
    """Why `name` cannot name an image file (control characters, bytes that were not UTF-8), or None."""
    if _UNDECODABLE.search(name):
        return "image name is not valid UTF-8"
    if any(ord(ch) in _CONTROL for ch in name):
        return "image name contains control characters"
    return None


class _Grouper:
    """Collects captions per image, keeping images in order of first appearance."""

    def __init__(self, root: Path | None = None, allow_outside: bool = False) -> None:
        self.records: dict[str, Record] = {}
        self.problems: list[str] = []
        self.root = root
        self.allow_outside = allow_outside

    def located(self, where: str, *parts: str) -> Path | None:
        """root/parts..., or None after noting that the parts lead outside the root."""
        assert self.root is not None, "located() needs the images root"
        path = self.root.joinpath(*parts)
        if not self.allow_outside and not _inside(self.root, path):
            self.problems.append(
                f"{where}: image path {'/'.join(parts)!r} leads outside the images folder {self.root}; "
                "allow it with --allow-outside-images"
            )
            return None
        return path

    def image(self, name: str, image_path: Path, split: str | None = None) -> Record:
        if name not in self.records:
            self.records[name] = Record(name, image_path, [], split)
        return self.records[name]

    def caption(self, text: object, where: str) -> str | None:
        """Return the cleaned caption, or None after noting why it was skipped."""
        if not isinstance(text, str):
            self.problems.append(f"{where}: caption missing or not text")
            return None
        if len(text) > MAX_CAPTION_CHARS:
            self.problems.append(f"{where}: caption of {len(text)} characters is over the limit of {MAX_CAPTION_CHARS}")
            return None
        if _UNDECODABLE.search(text):
            self.problems.append(f"{where}: caption is not valid UTF-8 text")
            return None
        cleaned = clean_caption(text)
        if not cleaned:
            self.problems.append(f"{where}: empty caption")
            return None
        return cleaned

    def image_name(self, name: str, where: str) -> str | None:
        """Return the stripped image name, or None after noting why it cannot name a file."""
        name = name.strip()
        why = "no image name" if not name else bad_image_name(name)
        if why:
            self.problems.append(f"{where}: {why}")
            return None
        return name

    def result(self) -> tuple[list[Record], list[str]]:
        return list(self.records.values()), self.problems


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` stays within `root` once `.` and `..` are resolved by name (symlinks are not followed)."""
    base, target = os.path.abspath(root), os.path.abspath(path)
    return os.path.commonpath([base, target]) == base


def _read(path: Path, fmt: str, images_root: Path | None, allow_outside: bool) -> tuple[str, list[Record], list[str]]:
    """Run the reader for `fmt` ("json" picks Karpathy or COCO by layout); return the format used."""
    if fmt == "folder":
        return (fmt, *_read_folder(path))
    grouper = _Grouper(images_root or _default_root(path), allow_outside)
    if fmt in ("json", "karpathy", "coco"):
        data = _load_json(path)
        fmt = _json_layout(data, path) if fmt == "json" else fmt
        reader = _read_karpathy if fmt == "karpathy" else _read_coco
        return (fmt, *reader(data, path, grouper))
    reader = _read_csv if fmt == "csv" else _read_jsonl
    return (fmt, *reader(path, grouper))


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl", ".json"):
        return suffix[1:]
    raise BadDataError(f"cannot tell the format of {path} from its name; pass fmt= (one of {', '.join(FORMATS)})")


def _json_layout(data: object, path: Path) -> str:
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return "coco"
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and all(isinstance(i, dict) and "sentences" in i for i in images[:1]):
        return "karpathy"
    raise BadDataError(f"{path}: JSON is neither a Karpathy split (images[].sentences) nor COCO captions (annotations[])")


def _load_json(path: Path) -> object:
    try:
        with path.open(encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadDataError(f"{path}: not valid JSON ({exc})") from exc


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(number, text) for each line of a text file; text is None for a line that is not UTF-8."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield number, None


def _default_root(path: Path) -> Path:
    beside = path.parent / "images"
    return beside if beside.is_dir() else path.parent


def _read_csv(path: Path, grouper: _Grouper) -> tuple[list[Record], list[str]]:
    """Rows of `image,caption`; a bad row (too long a field, bytes that are not UTF-8) is skipped and named."""
    # surrogateescape: a byte that is not UTF-8 spoils its own row, not the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [name.strip().lower() for name in next(reader, [])]
        except csv.Error as exc:
            raise BadDataError(f"{path}: line 1: unreadable CSV header ({exc})") from exc
        if "image" not in header or "caption" not in header:
            raise BadDataError(f"{path}: the first row must be a header naming 'image' and 'caption' columns")
        image_col, caption_col = header.index("image"), header.index("caption")
        for row, where in _csv_rows(reader, path, grouper.problems):
            if len(row) != len(header):
                grouper.problems.append(f"{where}: wrong number of fields: {len(row)}, expected {len(header)}")
                continue
            name = grouper.image_name(row[image_col], where)
            image_path = None if name is None else grouper.located(where, name)
            if image_path is None:
                continue
            caption = grouper.caption(row[caption_col], f"{where} ({name})")
            if caption is not None:
                grouper.image(name, image_path).captions.append(caption)
    return grouper.result()


def _csv_rows(reader, path: Path, problems: list[str]) -> Iterator[tuple[list[str], str]]:
    """(row, "PATH: line N") for each non-empty row; rows the csv module refuses go to `problems`."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit(): the reader goes on at the next line
            problems.append(f"{path}: line {reader.line_num}: unreadable CSV row ({exc})")
            continue
        if row:
            yield row, f"{path}: line {reader.line_num}"


def _read_jsonl(path: Path, grouper: _Grouper) -> tuple[list[Record], list[str]]:
    for number, line in _lines(path):
        where = f"{path}: line {number}"
        if line is None:
            grouper.problems.append(f"{where}: not UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            grouper.problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        name = row.get("image") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name.strip():
            grouper.problems.append(f"{where}: no \"image\" name")
            continue
        name = grouper.image_name(name, where)
        image_path = None if name is None else grouper.located(where, name)
        if image_path is None:
            continue
        texts = row.get("captions", row.get("caption"))
        if texts is None or texts == []:
            grouper.problems.append(f"{where} ({name}): no \"caption\" or \"captions\"")
            continue
        texts = texts if isinstance(texts, list) else [texts]
        captions = [c for c in (grouper.caption(t, f"{where} ({name})") for t in texts) if c is not None]
        if captions:
            grouper.image(name, image_path).captions.extend(captions)
    return grouper.result()


def _read_karpathy(data: object, path: Path, grouper: _Grouper) -> tuple[list[Record], list[str]]:
    images = _json_list(data, "images", path)
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(filename, str) or not filename.strip():
            grouper.problems.append(f"{where}: no filename")
            continue
        filename = grouper.image_name(filename, where)
        folder = entry.get("filepath") or ""
        if filename is None or not isinstance(folder, str) or (folder and grouper.image_name(folder, where) is None):
            continue
        image_path = grouper.located(where, folder, filename)
        if image_path is None:
            continue
        record = grouper.image(filename, image_path, entry.get("split"))
        sentences = entry.get("sentences", [])
        for j, sentence in enumerate(sentences if isinstance(sentences, list) else []):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            caption = grouper.caption(raw, f"{where} ({filename}) sentences[{j}]")
            if caption is not None:
                record.captions.append(caption)
    return grouper.result()


def _read_coco(data: object, path: Path, grouper: _Grouper) -> tuple[list[Record], list[str]]:
    by_id: dict[object, Record] = {}
    for i, entry in enumerate(_json_list(data, "images", path)):
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(file_name, str) or not file_name.strip() or not isinstance(entry.get("id"), (int, str)):
            grouper.problems.append(f"{path}: images[{i}]: needs an id and a file_name")
            continue
        file_name = grouper.image_name(file_name, f"{path}: images[{i}]")
        image_path = None if file_name is None else grouper.located(f"{path}: images[{i}]", file_name)
        if image_path is None:
            continue
        by_id[entry["id"]] = grouper.image(file_name, image_path)
    for i, ann in enumerate(_json_list(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        record = by_id.get(image_id) if isinstance(image_id, (int, str)) else None
        if record is None:
            grouper.problems.append(f"{where}: image_id is missing or not in images[]")
            continue
        caption = grouper.caption(ann.get("caption"), f"{where} ({record.image_name})")
        if caption is not None:
            record.captions.append(caption)
    return grouper.result()


def _read_folder(path: Path) -> tuple[list[Record], list[str]]:
    grouper = _Grouper()
    suffixes = image_extensions()
    images = (p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    for image_path in sorted(images, key=lambda p: p.relative_to(path).as_posix()):
        record = grouper.image(image_path.relative_to(path).as_posix(), image_path)
        sidecar = image_path.with_suffix(".txt")
        if not sidecar.is_file():
            continue
        try:
            text = sidecar.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            grouper.problems.append(f"{sidecar}: not UTF-8 text")
            continue
        first = next((line for line in text.splitlines() if line.strip()), "")
        caption = grouper.caption(first, str(sidecar))
        if caption is not None:
            record.captions.append(caption)
    return grouper.result()


def _json_list(data: object, key: str, path: Path) -> list:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise BadDataError(f"{path}: expected a top-level \"{key}\" list")
    return value


def _select_split(records: list[Record], split: str, path: Path) -> list[Record]:
    wanted = _SPLIT_ALIASES.get(split, {split})
    chosen = [r for r in records if r.split in wanted]
    if not chosen:
        present = sorted({r.split for r in records if r.split is not None})
        raise BadDataError(f"{path}: no images in split {split!r}; splits present: {', '.join(present) or 'none'}")
    return chosen


def _apply_split_file(
    records: list[Record], split_file: Path, label: str | None
) -> tuple[list[Record], list[str]]:
    if not split_file.is_file():
        raise BadDataError(f"split file not found: {split_file}")
    label = label or split_file.stem
    by_name = {r.image_name: r for r in records}
    chosen: dict[str, Record] = {}
    problems = []
    for number, line in _lines(split_file):
        if line is None:
            problems.append(f"{split_file}: line {number}: not UTF-8 text")
            continue
        name = line.strip()
        if not name or name in chosen:
            continue
        if name in by_name:
            chosen[name] = replace(by_name[name], split=label)
        else:
            problems.append(f"{split_file}: line {number}: {name} is not in the dataset")
    return list(chosen.values()), problems

