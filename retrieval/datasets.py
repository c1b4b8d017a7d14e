"""Captioned image datasets: one reader interface over the common file layouts."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from retrieval.errors import BadDataError


@dataclass
class Record:
    """One image with its captions, as read from a dataset."""

    image_id: str
    image_path: Path
    captions: list[str]
    split: str | None = None


@dataclass
class Dataset:
    """Records read from one source, and the rows that were skipped (each naming the item)."""

    records: list[Record]
    problems: list[str] = field(default_factory=list)


FORMATS = ("csv", "karpathy", "coco", "folder", "jsonl")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# Karpathy's "restval" images are the extra training images of his COCO split.
_SPLIT_ALIASES = {"train": {"train", "restval"}}


def load_dataset(
    path: str | Path,
    images_root: str | Path | None = None,
    split: str | None = None,
    split_file: str | Path | None = None,
    fmt: str | None = None,
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
    """
    path = Path(path)
    if not path.exists():
        raise BadDataError(f"dataset not found: {path}")
    if fmt is not None and fmt not in FORMATS:
        raise BadDataError(f"unknown dataset format {fmt!r} for {path}; expected one of {', '.join(FORMATS)}")
    fmt = fmt or _detect_format(path)
    if (fmt == "folder") != path.is_dir():
        raise BadDataError(f"{path}: the {fmt} format needs a {'folder' if fmt == 'folder' else 'file'}")
    if fmt == "folder" and images_root is not None:
        raise BadDataError(f"{path}: images_root does not apply to a folder of images")

    fmt, records, problems = _read(path, fmt, None if images_root is None else Path(images_root))
    if split_file is not None:
        records, split_problems = _apply_split_file(records, Path(split_file), split)
        problems += split_problems
    elif split is not None:
        if fmt != "karpathy":
            raise BadDataError(f"{path}: {fmt} datasets have no split field; pass a split file to select {split!r}")
        records = _select_split(records, split, path)
    return Dataset(records, problems)


def summarize_problems(problems: list[str], limit: int = 10) -> str:
    """Describe skipped items in a few lines: the count, then the first `limit` of them."""
    if not problems:
        return "no problems"
    head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    if len(problems) > limit:
        head += f"; first {limit}"
    return "\n  ".join([head + ":", *problems[:limit]])


def clean_caption(text: str) -> str:
    """Strip a caption and collapse its runs of whitespace to single spaces."""
    return " ".join(text.split())


class _Grouper:
    """Collects captions per image, keeping images in order of first appearance."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.problems: list[str] = []

    def image(self, image_id: str, image_path: Path, split: str | None = None) -> Record:
        if image_id not in self.records:
            self.records[image_id] = Record(image_id, image_path, [], split)
        return self.records[image_id]

    def caption(self, text: object, where: str) -> str | None:
        """Return the cleaned caption, or None after noting why it was skipped."""
        if not isinstance(text, str):
            self.problems.append(f"{where}: caption missing or not text")
            return None
        cleaned = clean_caption(text)
        if not cleaned:
            self.problems.append(f"{where}: empty caption")
            return None
        return cleaned

    def result(self) -> tuple[list[Record], list[str]]:
        return list(self.records.values()), self.problems


def _read(path: Path, fmt: str, images_root: Path | None) -> tuple[str, list[Record], list[str]]:
    """Run the reader for `fmt` ("json" picks Karpathy or COCO by layout); return the format used."""
    if fmt == "folder":
        return (fmt, *_read_folder(path))
    root = images_root or _default_root(path)
    if fmt in ("json", "karpathy", "coco"):
        data = _load_json(path)
        fmt = _json_layout(data, path) if fmt == "json" else fmt
        reader = _read_karpathy if fmt == "karpathy" else _read_coco
        return (fmt, *reader(data, path, root))
    reader = _read_csv if fmt == "csv" else _read_jsonl
    return (fmt, *reader(path, root))


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


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise BadDataError(f"{path}: not UTF-8 text ({exc})") from exc


def _default_root(path: Path) -> Path:
    beside = path.parent / "images"
    return beside if beside.is_dir() else path.parent


def _read_csv(path: Path, root: Path) -> tuple[list[Record], list[str]]:
    grouper = _Grouper()
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [name.strip().lower() for name in next(reader, [])]
            if "image" not in header or "caption" not in header:
                raise BadDataError(f"{path}: the first row must be a header naming 'image' and 'caption' columns")
            image_col, caption_col = header.index("image"), header.index("caption")
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if not row:
                    continue
                if len(row) != len(header):
                    grouper.problems.append(f"{where}: wrong number of fields: {len(row)}, expected {len(header)}")
                    continue
                image_id = row[image_col].strip()
                if not image_id:
                    grouper.problems.append(f"{where}: no image name")
                    continue
                caption = grouper.caption(row[caption_col], f"{where} ({image_id})")
                if caption is not None:
                    grouper.image(image_id, root / image_id).captions.append(caption)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise BadDataError(f"{path}: line {reader.line_num}: unreadable CSV ({exc})") from exc
    return grouper.result()


def _read_jsonl(path: Path, root: Path) -> tuple[list[Record], list[str]]:
    grouper = _Grouper()
    for number, line in enumerate(_read_lines(path), start=1):
        where = f"{path}: line {number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            grouper.problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        image_id = row.get("image") if isinstance(row, dict) else None
        if not isinstance(image_id, str) or not image_id.strip():
            grouper.problems.append(f"{where}: no \"image\" name")
            continue
        image_id = image_id.strip()
        texts = row.get("captions", row.get("caption"))
        if texts is None or texts == []:
            grouper.problems.append(f"{where} ({image_id}): no \"caption\" or \"captions\"")
            continue
        texts = texts if isinstance(texts, list) else [texts]
        captions = [c for c in (grouper.caption(t, f"{where} ({image_id})") for t in texts) if c is not None]
        if captions:
            grouper.image(image_id, root / image_id).captions.extend(captions)
    return grouper.result()


def _read_karpathy(data: object, path: Path, root: Path) -> tuple[list[Record], list[str]]:
    grouper = _Grouper()
    images = _json_list(data, "images", path)
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(filename, str) or not filename.strip():
            grouper.problems.append(f"{where}: no filename")
            continue
        filename = filename.strip()
        record = grouper.image(filename, root / str(entry.get("filepath") or "") / filename, entry.get("split"))
        sentences = entry.get("sentences", [])
        for j, sentence in enumerate(sentences if isinstance(sentences, list) else []):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            caption = grouper.caption(raw, f"{where} ({filename}) sentences[{j}]")
            if caption is not None:
                record.captions.append(caption)
    return grouper.result()


def _read_coco(data: object, path: Path, root: Path) -> tuple[list[Record], list[str]]:
    grouper = _Grouper()
    by_id: dict[object, Record] = {}
    for i, entry in enumerate(_json_list(data, "images", path)):
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(file_name, str) or not file_name.strip() or not isinstance(entry.get("id"), (int, str)):
            grouper.problems.append(f"{path}: images[{i}]: needs an id and a file_name")
            continue
        file_name = file_name.strip()
        by_id[entry["id"]] = grouper.image(file_name, root / file_name)
    for i, ann in enumerate(_json_list(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        record = by_id.get(image_id) if isinstance(image_id, (int, str)) else None
        if record is None:
            grouper.problems.append(f"{where}: image_id is missing or not in images[]")
            continue
        caption = grouper.caption(ann.get("caption"), f"{where} ({record.image_id})")
        if caption is not None:
            record.captions.append(caption)
    return grouper.result()


def _read_folder(path: Path) -> tuple[list[Record], list[str]]:
    grouper = _Grouper()
    images = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
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
    by_id = {r.image_id: r for r in records}
    chosen: dict[str, Record] = {}
    problems = []
    for number, line in enumerate(_read_lines(split_file), start=1):
        name = line.strip()
        if not name or name in chosen:
            continue
        if name in by_id:
            chosen[name] = replace(by_id[name], split=label)
        else:
            problems.append(f"{split_file}: line {number}: {name} is not in the dataset")
    return list(chosen.values()), problems

