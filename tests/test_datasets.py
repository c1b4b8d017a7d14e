"""load_dataset over every supported layout, with splits, skipped rows and errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import FLICKR8K, needs_flickr8k
from retrieval.datasets import Record, load_dataset, summarize_problems
from retrieval.errors import BadDataError



def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.image_name: r for r in records}


# --- CSV -------------------------------------------------------------------------------------


def test_csv_groups_captions_keeps_first_appearance_order_and_quoted_commas(tmp_path: Path) -> None:
    csv_path = write(
        tmp_path / "captions.csv",
        "image,caption\n"
        'b.jpg,"A dog, brown, runs ."\n'
        "a.jpg,  A cat   sits\t.  \n"
        'b.jpg,"He said ""hi"" , twice"\n',
    )
    data = load_dataset(csv_path)
    assert [r.image_name for r in data.records] == ["b.jpg", "a.jpg"]
    assert data.records[0].captions == ["A dog, brown, runs .", 'He said "hi" , twice']
    assert data.records[1].captions == ["A cat sits ."]
    assert data.records[0].image_path == tmp_path / "b.jpg"
    assert data.records[0].split is None
    assert data.problems == []


def test_csv_images_resolve_under_images_folder_beside_it_or_images_root(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "captions.csv", "image,caption\nsub/a.jpg,a cat\n")
    (tmp_path / "images").mkdir()
    assert load_dataset(csv_path).records[0].image_path == tmp_path / "images" / "sub" / "a.jpg"
    other = tmp_path / "elsewhere"
    assert load_dataset(csv_path, images_root=other).records[0].image_path == other / "sub" / "a.jpg"


def test_csv_bad_rows_are_skipped_and_named(tmp_path: Path) -> None:
    csv_path = write(
        tmp_path / "caps.csv",
        "image,caption\n"
        "a.jpg,good one\n"
        "a.jpg,too,many,columns\n"
        "b.jpg\n"
        ",no image\n"
        "c.jpg,   \n"
        "\n"
        "d.jpg,fine\n",
    )
    data = load_dataset(csv_path)
    assert by_id(data.records) == {
        "a.jpg": Record("a.jpg", tmp_path / "a.jpg", ["good one"]),
        "d.jpg": Record("d.jpg", tmp_path / "d.jpg", ["fine"]),
    }
    assert data.problems == [
        f"{csv_path}: line 3: wrong number of fields: 4, expected 2",
        f"{csv_path}: line 4: wrong number of fields: 1, expected 2",
        f"{csv_path}: line 5: no image name",
        f"{csv_path}: line 6 (c.jpg): empty caption",
    ]


def test_csv_without_header_is_an_error(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "caps.csv", "a.jpg,a cat\n")
    with pytest.raises(BadDataError, match="header"):
        load_dataset(csv_path)


# --- Karpathy --------------------------------------------------------------------------------


def karpathy_file(tmp_path: Path) -> Path:
    images = [
        {"filename": "t.jpg", "filepath": "train2014", "split": "train", "sentences": [{"raw": " A  train image. "}, {"raw": "two"}]},
        {"filename": "r.jpg", "filepath": "val2014", "split": "restval", "sentences": [{"raw": "restval"}]},
        {"filename": "v.jpg", "split": "val", "sentences": [{"raw": "val"}, {"tokens": ["no", "raw"]}]},
        {"filename": "x.jpg", "split": "test", "sentences": [{"raw": "test"}]},
        {"split": "test", "sentences": [{"raw": "nameless"}]},
    ]
    return write(tmp_path / "dataset_coco.json", json.dumps({"dataset": "coco", "images": images}))


def test_karpathy_reads_paths_captions_and_split_field(tmp_path: Path) -> None:
    path = karpathy_file(tmp_path)
    data = load_dataset(path)
    records = by_id(data.records)
    assert list(records) == ["t.jpg", "r.jpg", "v.jpg", "x.jpg"]
    assert records["t.jpg"] == Record("t.jpg", tmp_path / "train2014" / "t.jpg", ["A train image.", "two"], "train")
    assert records["v.jpg"].image_path == tmp_path / "v.jpg"
    assert records["v.jpg"].captions == ["val"]
    assert data.problems == [
        f"{path}: images[2] (v.jpg) sentences[1]: caption missing or not text",
        f"{path}: images[4]: no filename",
    ]
    assert load_dataset(path, images_root="/data/coco").records[0].image_path == Path("/data/coco/train2014/t.jpg")


def test_karpathy_split_selection_train_includes_restval(tmp_path: Path) -> None:
    path = karpathy_file(tmp_path)
    assert [(r.image_name, r.split) for r in load_dataset(path, split="train").records] == [("t.jpg", "train"), ("r.jpg", "restval")]
    assert [r.image_name for r in load_dataset(path, split="test").records] == ["x.jpg"]
    assert [r.image_name for r in load_dataset(path, split="restval").records] == ["r.jpg"]
    with pytest.raises(BadDataError, match="no images in split 'tset'; splits present: restval, test, train, val"):
        load_dataset(path, split="tset")


# --- COCO ------------------------------------------------------------------------------------


def test_coco_captions_grouped_by_image_id(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 7, "file_name": "seven.jpg"}, {"id": 3, "file_name": "three.jpg"}, {"id": 9}],
        "annotations": [
            {"image_id": 3, "caption": "three one"},
            {"image_id": 7, "caption": "seven\none"},
            {"image_id": 3, "caption": "three two"},
            {"image_id": 42, "caption": "orphan"},
            {"image_id": 7, "caption": ""},
        ],
    }
    path = write(tmp_path / "captions_val2014.json", json.dumps(coco))
    data = load_dataset(path, images_root=tmp_path / "val2014")
    assert data.records == [
        Record("seven.jpg", tmp_path / "val2014" / "seven.jpg", ["seven one"]),
        Record("three.jpg", tmp_path / "val2014" / "three.jpg", ["three one", "three two"]),
    ]
    assert data.problems == [
        f"{path}: images[2]: needs an id and a file_name",
        f"{path}: annotations[3]: image_id is missing or not in images[]",
        f"{path}: annotations[4] (seven.jpg): empty caption",
    ]


def test_json_of_unknown_layout_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "other.json", json.dumps({"rows": []}))
    with pytest.raises(BadDataError, match="neither a Karpathy split"):
        load_dataset(path)
    broken = write(tmp_path / "broken.json", "{not json")
    with pytest.raises(BadDataError, match="broken.json: not valid JSON"):
        load_dataset(broken)


# --- folder ----------------------------------------------------------------------------------


def test_folder_with_sidecar_captions(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name in ["cat.png", "b/dog.JPG", "b/a/bird.webp", "Zebra.Jpeg", "lonely.gif", "blank.bmp"]:
        write(root / name, "not really an image")
    write(root / "cat.txt", "\n\n  A cat   on a mat. \nsecond line ignored\n")
    write(root / "b" / "dog.txt", "A dog.")
    write(root / "blank.txt", "  \n\n")
    write(root / "notes.md", "not an image")
    write(root / "b" / "a" / "bird.txt", "A bird.")
    data = load_dataset(root)
    assert [r.image_name for r in data.records] == ["Zebra.Jpeg", "b/a/bird.webp", "b/dog.JPG", "blank.bmp", "cat.png", "lonely.gif"]
    records = by_id(data.records)
    assert records["cat.png"] == Record("cat.png", root / "cat.png", ["A cat on a mat."])
    assert records["b/dog.JPG"].captions == ["A dog."]
    assert records["lonely.gif"].captions == []
    assert records["blank.bmp"].captions == []
    assert data.problems == [f"{root / 'blank.txt'}: empty caption"]


def test_folder_rejects_images_root_and_file_formats_reject_folders(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="images_root does not apply"):
        load_dataset(tmp_path, images_root=tmp_path)
    with pytest.raises(BadDataError, match="csv format needs a file"):
        load_dataset(tmp_path, fmt="csv")


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_single_and_list_captions_with_bad_lines_named(tmp_path: Path) -> None:
    path = write(
        tmp_path / "data.jsonl",
        '{"image": "a.jpg", "caption": "first"}\n'
        "\n"
        '{"image": "b.jpg", "captions": ["one", " two ", ""]}\n'
        "{bad json\n"
        '{"caption": "no image"}\n'
        '{"image": "c.jpg"}\n'
        '{"image": "d.jpg", "captions": []}\n'
        '{"image": "a.jpg", "caption": "second"}\n'
        "[1, 2]\n",
    )
    data = load_dataset(path)
    assert data.records == [
        Record("a.jpg", tmp_path / "a.jpg", ["first", "second"]),
        Record("b.jpg", tmp_path / "b.jpg", ["one", "two"]),
    ]
    assert len(data.problems) == 6
    assert data.problems[0] == f"{path}: line 3 (b.jpg): empty caption"
    assert data.problems[1].startswith(f"{path}: line 4: not valid JSON")
    assert data.problems[2:] == [
        f'{path}: line 5: no "image" name',
        f'{path}: line 6 (c.jpg): no "caption" or "captions"',
        f'{path}: line 7 (d.jpg): no "caption" or "captions"',
        f'{path}: line 9: no "image" name',
    ]


# --- splits ----------------------------------------------------------------------------------


def test_split_file_selects_in_its_order_and_labels_by_stem(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "caps.csv", "image,caption\na.jpg,x\nb.jpg,y\nc.jpg,z\n")
    split_file = write(tmp_path / "splits" / "dev.txt", "c.jpg\n\nmissing.jpg\na.jpg\nc.jpg\n")
    data = load_dataset(csv_path, split_file=split_file)
    assert [(r.image_name, r.split) for r in data.records] == [("c.jpg", "dev"), ("a.jpg", "dev")]
    assert data.problems == [f"{split_file}: line 3: missing.jpg is not in the dataset"]
    named = load_dataset(csv_path, split="val", split_file=split_file)
    assert {r.split for r in named.records} == {"val"}


def test_split_needs_a_split_field_or_file(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "caps.csv", "image,caption\na.jpg,x\n")
    with pytest.raises(BadDataError, match="csv datasets have no split field"):
        load_dataset(csv_path, split="train")
    with pytest.raises(BadDataError, match="split file not found"):
        load_dataset(csv_path, split_file=tmp_path / "nope.txt")


# --- errors and summaries --------------------------------------------------------------------


def test_missing_file_and_unknown_format_are_errors(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="dataset not found"):
        load_dataset(tmp_path / "absent.csv")
    tsv = write(tmp_path / "caps.tsv", "image\tcaption\n")
    with pytest.raises(BadDataError, match="cannot tell the format"):
        load_dataset(tsv)
    with pytest.raises(BadDataError, match="unknown dataset format 'parquet'"):
        load_dataset(tsv, fmt="parquet")


def test_fmt_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path / "captions.txt", '{"image": "a.jpg", "caption": "hi"}\n')
    assert load_dataset(path, fmt="jsonl").records == [Record("a.jpg", tmp_path / "a.jpg", ["hi"])]


def test_summarize_problems() -> None:
    assert summarize_problems([]) == "no problems"
    assert summarize_problems(["x: line 2: bad"]) == "1 problem:\n  x: line 2: bad"
    text = summarize_problems([f"p{i}" for i in range(12)], limit=3)
    assert text == "12 problems; first 3:\n  p0\n  p1\n  p2"


# --- the real Flickr8k sample ----------------------------------------------------------------


@needs_flickr8k
def test_flickr8k_dev_split() -> None:
    data = load_dataset(FLICKR8K / "captions.csv", split_file=FLICKR8K / "splits" / "dev.txt")
    assert data.problems == []
    assert len(data.records) == 1000
    assert all(len(r.captions) == 5 and r.split == "dev" for r in data.records)
    first_name = (FLICKR8K / "splits" / "dev.txt").read_text().split()[0]
    assert data.records[0].image_name == first_name
    assert data.records[0].image_path == FLICKR8K / "images" / first_name
    assert data.records[0].image_path.is_file()


# --- hostile rows: each spoils only itself -----------------------------------------------------


def test_csv_a_huge_field_skips_only_its_row(tmp_path: Path) -> None:
    huge = "x" * 140_000  # over the csv module's 131,072-character field limit
    csv_path = write(tmp_path / "caps.csv", f"image,caption\na.jpg,first\nb.jpg,{huge}\nc.jpg,last\nd.jpg,{'y' * 20_000}\n")
    data = load_dataset(csv_path)
    assert [r.image_name for r in data.records] == ["a.jpg", "c.jpg"]
    assert len(data.problems) == 2
    assert data.problems[0].startswith(f"{csv_path}: line 3: unreadable CSV row (field larger than field limit")
    assert data.problems[1] == f"{csv_path}: line 5 (d.jpg): caption of 20000 characters is over the limit of 10000"


def test_csv_an_invalid_utf8_byte_skips_only_its_row_and_names_its_line(tmp_path: Path) -> None:
    csv_path = tmp_path / "caps.csv"
    csv_path.write_bytes(b"image,caption\na.jpg,good\nb.jpg,caf\xe9 au lait\n\xff.jpg,name\nc.jpg,also good\n")
    data = load_dataset(csv_path)
    assert [r.image_name for r in data.records] == ["a.jpg", "c.jpg"]
    assert data.problems == [
        f"{csv_path}: line 3 (b.jpg): caption is not valid UTF-8 text",
        f"{csv_path}: line 4: image name is not valid UTF-8",
    ]


def test_nul_and_control_characters(tmp_path: Path) -> None:
    csv_path = tmp_path / "caps.csv"
    csv_path.write_bytes(b"image,caption\na.jpg,a dog\x00runs\x07 fast\nb\x00.jpg,hidden name\n")
    data = load_dataset(csv_path)
    assert by_id(data.records)["a.jpg"].captions == ["a dog runs fast"]
    assert data.problems == [f"{csv_path}: line 3: image name contains control characters"]
    jsonl = write(tmp_path / "caps.jsonl", json.dumps({"image": "c.jpg", "caption": "nul\u0000 inside"}) + "\n")
    assert load_dataset(jsonl).records[0].captions == ["nul inside"]


def test_jsonl_an_invalid_utf8_line_skips_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "one"}\n{"image": "b.jpg", "caption": "\xff"}\n{"image": "c.jpg", "caption": "three"}\n')
    data = load_dataset(path)
    assert [r.image_name for r in data.records] == ["a.jpg", "c.jpg"]
    assert data.problems == [f"{path}: line 2: not UTF-8 text"]


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "sub/../../x.png", "./../x.png"])
def test_image_paths_outside_the_images_folder_need_an_opt_in(tmp_path: Path, name: str) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    csv_path = write(tmp_path / "caps.csv", f"image,caption\nok.png,fine\n{name},sneaky\n")
    data = load_dataset(csv_path, images_root=images)
    assert [r.image_name for r in data.records] == ["ok.png"]
    assert len(data.problems) == 1 and "outside the images folder" in data.problems[0]
    assert "--allow-outside-images" in data.problems[0]
    allowed = load_dataset(csv_path, images_root=images, allow_outside_images=True)
    assert [r.image_name for r in allowed.records] == ["ok.png", name]


def test_paths_inside_stay_allowed(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "caps.csv", "image,caption\nsub/a.png,one\nsub/../b.png,two\n")
    assert [r.image_path for r in load_dataset(csv_path).records] == [tmp_path / "sub/a.png", tmp_path / "sub/../b.png"]
    karpathy = write(
        tmp_path / "k.json",
        json.dumps({"images": [{"filename": "a.jpg", "filepath": "..", "sentences": [{"raw": "x"}]},
                               {"filename": "b.jpg", "filepath": "val", "sentences": [{"raw": "y"}]}]}),
    )
    data = load_dataset(karpathy)
    assert [r.image_name for r in data.records] == ["b.jpg"] and "outside" in data.problems[0]
    coco = write(
        tmp_path / "c.json",
        json.dumps({"images": [{"id": 1, "file_name": "/abs.jpg"}, {"id": 2, "file_name": "in.jpg"}],
                    "annotations": [{"image_id": 2, "caption": "z"}]}),
    )
    assert [r.image_name for r in load_dataset(coco).records] == ["in.jpg"]
