"""User-supplied image/mask folder datasets (promptmatch.datasets.folder).

Tiny PNG datasets are written into tmp_path by each test; the export test uses the
``texture_mosaic`` offline dataset (built once into the usual cache if needed).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pytest
from PIL import Image

from promptmatch import datasets as D
from promptmatch.datasets.folder import (
    FolderDataset,
    FolderDatasetError,
    check_folder_dataset,
    describe_folder_dataset,
    export_offline_as_folder,
    folder_pairs,
    load_folder_split,
)

CLASSES = ["sky", "road", "car"]
W, H = 16, 12


def _image(seed: int, size=(W, H)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _mask(seed: int, size=(W, H), values=(0, 1, 2, 255)) -> np.ndarray:
    return np.random.default_rng(1000 + seed).choice(np.array(values, np.uint8), (size[1], size[0]))


def _write_pair(root: Path, split: str, stem: str, seed: int, size=(W, H), values=(0, 1, 2, 255)) -> None:
    for sub in ("img_dir", "ann_dir"):
        (root / sub / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(seed, size)).save(root / "img_dir" / split / f"{stem}.png")
    Image.fromarray(_mask(seed, size, values)).save(root / "ann_dir" / split / f"{stem}.png")


def make_dataset(root: Path, counts: Optional[Dict[str, int]] = None, classes_file: bool = True) -> Path:
    """A valid dataset: 3 train and 2 val pairs of 16x12 images, 3 classes."""
    counts = counts or {"train": 3, "val": 2}
    seed = 0
    for split, n in counts.items():
        for i in range(n):
            _write_pair(root, split, f"{i:04d}", seed)
            seed += 1
    if classes_file:
        (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def _check(root: Path, **kw) -> Dict[str, int]:
    return check_folder_dataset(describe_folder_dataset(root, **kw))


# ------------------------------------------------------------------------------ good data
def test_good_dataset_passes(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ds = describe_folder_dataset(root)
    assert ds.classes == tuple(CLASSES) and ds.num_classes == 3 and ds.palette is None
    assert ds.img_dir("train") == root / "img_dir" / "train" and ds.ann_dir("val") == root / "ann_dir" / "val"
    assert check_folder_dataset(ds) == {"train": 3, "val": 2}
    assert check_folder_dataset(ds, check_labels=False, progress=True) == {"train": 3, "val": 2}
    pairs = folder_pairs(ds, "train")
    assert [(i.name, m.name) for i, m in pairs] == [("0000.png", "0000.png"), ("0001.png", "0001.png"),
                                                   ("0002.png", "0002.png")]
    assert pairs[0][0].parent == root / "img_dir" / "train"
    # the package exports the API; the dataclass is frozen and hashable
    assert D.FolderDataset is FolderDataset and "load_folder_split" in D.__all__
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.root = tmp_path  # type: ignore[misc]
    assert hash(ds) == hash(describe_folder_dataset(root))


def test_jpeg_images_subfolders_and_suffixes(tmp_path):
    """Any of .png/.jpg/.jpeg (any case) by default; stems may hold sub-folders; explicit
    suffixes as in mmseg (e.g. cityscapes-style endings)."""
    root = tmp_path / "ds"
    for sub in ("img_dir/train/city_a", "ann_dir/train/city_a"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(_image(0)).save(root / "img_dir/train/a.JPG")
    Image.fromarray(_image(1)).save(root / "img_dir/train/city_a/b.jpeg")
    Image.fromarray(_mask(0)).save(root / "ann_dir/train/a.png")
    Image.fromarray(_mask(1)).save(root / "ann_dir/train/city_a/b.png")
    (root / "img_dir/train/.DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    (root / "img_dir/train/notes.txt").write_text("not an image")  # not image-like: ignored
    ds = describe_folder_dataset(root, classes=CLASSES, splits=["train"])
    assert check_folder_dataset(ds) == {"train": 2}
    assert [p[1].relative_to(root).as_posix() for p in folder_pairs(ds, "train")] == [
        "ann_dir/train/a.png", "ann_dir/train/city_a/b.png"]
    images, labels = load_folder_split(ds, "train")
    assert images.shape == (2, H, W, 3) and labels.shape == (2, H, W)

    root2 = tmp_path / "cs"
    _write_pair(root2, "train", "x", 0)
    (root2 / "img_dir/train/x.png").rename(root2 / "img_dir/train/x_leftImg8bit.png")
    (root2 / "ann_dir/train/x.png").rename(root2 / "ann_dir/train/x_gtFine_labelTrainIds.png")
    ds2 = describe_folder_dataset(root2, classes=CLASSES, splits=["train"], img_suffix="_leftImg8bit.png",
                                  seg_map_suffix="_gtFine_labelTrainIds.png")
    assert check_folder_dataset(ds2) == {"train": 1}


# ------------------------------------------------------------------------------ bad data
def _rm(rel: str) -> Callable[[Path], None]:
    def f(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f


def _empty_val(root: Path) -> None:
    for sub in ("img_dir", "ann_dir"):
        for f in (root / sub / "val").iterdir():
            f.unlink()


def _extra_mask(root: Path) -> None:
    Image.fromarray(_mask(9)).save(root / "ann_dir/train/extra.png")


def _garbage(rel: str) -> Callable[[Path], None]:
    def f(root: Path) -> None:
        (root / rel).write_bytes(b"this is not a png file at all" * 10)
    return f


def _truncate(rel: str) -> Callable[[Path], None]:
    def f(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])
    return f


def _small_mask(root: Path) -> None:
    Image.fromarray(_mask(0, size=(8, 8))).save(root / "ann_dir/train/0001.png")


def _rgb_mask(root: Path) -> None:
    Image.fromarray(np.stack([_mask(0)] * 3, axis=-1)).save(root / "ann_dir/val/0000.png")


def _out_of_range(root: Path) -> None:
    Image.fromarray(_mask(0, values=(0, 1, 7, 200))).save(root / "ann_dir/train/0002.png")


def _jpeg_mask(root: Path) -> None:
    _extra_pair_image(root)
    Image.fromarray(_mask(5)).save(root / "ann_dir/train/late.jpg")


def _extra_pair_image(root: Path) -> None:
    Image.fromarray(_image(5)).save(root / "img_dir/train/late.png")


def _tif_image(root: Path) -> None:
    Image.fromarray(_image(6)).save(root / "img_dir/val/scan.tif")


def _duplicate_stem(root: Path) -> None:
    Image.fromarray(_image(7)).save(root / "img_dir/train/0000.jpg")


def _missing_ann_and_stray(root: Path) -> None:
    _rm("ann_dir/val")(root)
    _tif_image(root)


def _no_img_dir_at_all(root: Path) -> None:
    (root / "img_dir").rename(root / "images")


BAD_CASES = {
    # name: (how to break the good dataset, substrings the error message must contain)
    "missing_img_split": (_rm("img_dir/val"), ["missing folder", "img_dir/val", "'val' images"]),
    "missing_ann_split": (_rm("ann_dir/train"), ["missing folder", "ann_dir/train", "'train' masks"]),
    "missing_ann_split_and_stray_image": (_missing_ann_and_stray, ["missing folder", "ann_dir/val",
                                                                   "img_dir/val/scan.tif"]),
    "wrong_layout": (_no_img_dir_at_all, ["has no img_dir/ folder", "images/", "img_dir/train"]),
    "empty_split": (_empty_val, ["img_dir/val: split has no images"]),
    "image_without_mask": (_rm("ann_dir/train/0001.png"),
                           ["img_dir/train/0001.png: image has no mask", "ann_dir/train/<stem>.png"]),
    "mask_without_image": (_extra_mask, ["ann_dir/train/extra.png: mask has no image"]),
    "corrupt_image": (_garbage("img_dir/train/0000.png"), ["img_dir/train/0000.png: image cannot be read"]),
    "truncated_image": (_truncate("img_dir/val/0001.png"), ["img_dir/val/0001.png: image cannot be read"]),
    "corrupt_mask": (_garbage("ann_dir/val/0001.png"), ["ann_dir/val/0001.png: mask cannot be read"]),
    "truncated_mask": (_truncate("ann_dir/train/0002.png"), ["ann_dir/train/0002.png: mask cannot be read"]),
    "mask_size": (_small_mask, ["ann_dir/train/0001.png: mask size differs", "mask 8x8, image 16x12",
                                "nearest"]),
    "rgb_mask": (_rgb_mask, ["ann_dir/val/0000.png: mask is not a single-channel", "mode RGB, 3 channels",
                             "mode L or P"]),
    "labels_out_of_range": (_out_of_range, ["ann_dir/train/0002.png: mask has label values that are "
                                            "neither class indices 0..2 nor the ignore value 255",
                                            "values 7, 200", "3 classes", "reduce_zero_label=True"]),
    "jpeg_mask": (_jpeg_mask, ["ann_dir/train/late.jpg: mask file does not end with .png",
                               "JPEG compression changes label values",
                               "img_dir/train/late.png: image has no mask"]),
    "tif_image": (_tif_image, ["img_dir/val/scan.tif: image file does not end with .png/.jpg/.jpeg"]),
    "duplicate_stem": (_duplicate_stem, ["img_dir/train/0000.png: stem has more than one file",
                                       "same stem as 0000.jpg"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_data_is_reported(tmp_path, case):
    breaker, expected = BAD_CASES[case]
    root = make_dataset(tmp_path / "ds")
    ds = describe_folder_dataset(root)
    breaker(root)
    with pytest.raises(FolderDatasetError) as info:
        check_folder_dataset(ds)
    msg = str(info.value)
    assert msg.startswith(f"folder dataset {root} has {len(info.value.problems)} problem(s):"), msg
    for part in expected:
        assert part in msg, (part, msg)
    assert isinstance(info.value, ValueError)


def test_missing_root(tmp_path):
    root = tmp_path / "nope"
    for call in (lambda: describe_folder_dataset(root, classes=CLASSES),
                 lambda: check_folder_dataset(FolderDataset(root, tuple(CLASSES))),
                 lambda: folder_pairs(FolderDataset(root, tuple(CLASSES)), "train")):
        with pytest.raises(FolderDatasetError, match="does not exist") as info:
            call()
        assert str(root) in str(info.value) and len(info.value.problems) == 1


def test_label_check_can_be_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _out_of_range(root)
    ds = describe_folder_dataset(root)
    assert check_folder_dataset(ds, check_labels=False) == {"train": 3, "val": 2}
    _rgb_mask(root)  # header-level problems are still found
    with pytest.raises(FolderDatasetError, match="mode RGB"):
        check_folder_dataset(ds, check_labels=False)


def test_all_problems_in_one_error(tmp_path):
    """Problems of every kind and split are collected; a repeated kind is counted and shows
    at most max_examples file names."""
    root = make_dataset(tmp_path / "ds", counts={"train": 9, "val": 2})
    for i in range(7):
        (root / f"ann_dir/train/{i:04d}.png").unlink()
    _rgb_mask(root)
    _garbage("img_dir/train/0008.png")(root)
    for i in (7, 8):  # two masks with bad values: the values of both are summed up
        Image.fromarray(_mask(i, values=(0, 9 + i))).save(root / f"ann_dir/train/{i:04d}.png")
    ds = describe_folder_dataset(root)
    with pytest.raises(FolderDatasetError) as info:
        check_folder_dataset(ds, max_examples=3)
    err = info.value
    msg = str(err)
    assert msg.startswith(f"folder dataset {root} has 4 problem(s):\n"), msg
    assert len(err.problems) == 4 and all(p in msg for p in err.problems)
    no_mask = next(p for p in err.problems if "no mask" in p)
    assert no_mask.startswith("img_dir/train: 7 images have no mask: 0000.png, 0001.png, 0002.png, "
                              "... and 4 more;"), no_mask
    assert "0003.png" not in no_mask
    labels = next(p for p in err.problems if "label values" in p)
    assert "ann_dir/train: 2 masks have label values" in labels and "values found: 16, 17" in labels
    assert "0000.png" in next(p for p in err.problems if "mode RGB" in p)
    assert "0008.png: image cannot be read" in msg
    # the error survives pickling (e.g. from a worker process) with its problems
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == msg


# ------------------------------------------------------------------------------ classes
@pytest.mark.parametrize("form", ["json_list", "json_dict", "txt"])
def test_classes_from_file(tmp_path, form):
    root = make_dataset(tmp_path / "ds", classes_file=False)
    palette = [[0, 0, 255], [128, 128, 128], [255, 0, 0]]
    if form == "json_list":
        (root / "classes.json").write_text(json.dumps(CLASSES))
    elif form == "json_dict":
        (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "palette": palette}))
    else:
        (root / "classes.txt").write_text("\ufeffsky\n\nroad\n  car  \n\n", encoding="utf-8")  # BOM: ok
    ds = describe_folder_dataset(root)
    assert ds.classes == tuple(CLASSES)
    assert ds.palette == (tuple(map(tuple, palette)) if form == "json_dict" else None)
    override = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert describe_folder_dataset(root, palette=override).palette == ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    # explicit classes win over the file
    assert describe_folder_dataset(root, classes=["a", "b"]).classes == ("a", "b")
    assert check_folder_dataset(ds) == {"train": 3, "val": 2}


def test_missing_classes_error(tmp_path):
    root = make_dataset(tmp_path / "ds", classes_file=False)
    with pytest.raises(FolderDatasetError) as info:
        describe_folder_dataset(root)
    msg = str(info.value)
    for way in ("classes=[...]", "classes.json", '{"classes": [...], "palette"', "classes.txt",
                "one name per line"):
        assert way in msg, (way, msg)


@pytest.mark.parametrize("kwargs, files, expected", [
    (dict(classes=[]), {}, ["no classes"]),
    (dict(classes=["a", "b", "a"]), {}, ["duplicate class names 'a'"]),
    (dict(classes="sky"), {}, ["classes must be a list of class names"]),
    (dict(classes=["a", "b"], palette=[[0, 0, 0]]), {}, ["palette has 1 colours but there are 2 classes"]),
    (dict(classes=["a"], palette=[[0, 0, 256]]), {}, ["ints in 0..255"]),
    (dict(classes=["a"], splits=[]), {}, ["splits must be a non-empty list"]),
    (dict(classes=["a"], splits=["train", "../x"]), {}, ["split names must be folder names"]),
    (dict(classes=[f"c{i}" for i in range(256)]), {}, ["256 classes do not fit below the ignore index 255"]),
    (dict(), {"classes.json": "{not json"}, ["classes.json is not valid JSON"]),
    (dict(), {"classes.json": '{"names": ["a"]}'}, ["must hold a JSON list of class names"]),
    (dict(), {"classes.json": '{"classes": ["a", "b"], "palette": [[1, 2, 3]]}'},
     ["palette has 1 colours but there are 2 classes"]),
    (dict(), {"classes.json": '["a", "b"]', "classes.txt": "a\nc\n"}, ["list different classes"]),
    (dict(), {"classes.txt": "a\nb\na\n"}, ["duplicate class names 'a'"]),
])
def test_description_errors(tmp_path, kwargs, files, expected):
    root = make_dataset(tmp_path / "ds", classes_file=False)
    for name, text in files.items():
        (root / name).write_text(text)
    with pytest.raises(FolderDatasetError) as info:
        describe_folder_dataset(root, **kwargs)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


def test_dataclass_validates_and_normalises(tmp_path):
    ds = FolderDataset(str(tmp_path), ["a", "b"], palette=np.array([[1, 2, 3], [4, 5, 6]]), splits=["train"])
    assert ds.root == tmp_path and ds.classes == ("a", "b") and ds.splits == ("train",)
    assert ds.palette == ((1, 2, 3), (4, 5, 6))
    with pytest.raises(FolderDatasetError, match="duplicate class names"):
        FolderDataset(tmp_path, ("a", "a"))
    with pytest.raises(FolderDatasetError, match="ignore_index must be an int"):
        FolderDataset(tmp_path, ("a",), ignore_index=300)
    with pytest.raises(FolderDatasetError, match="root must be a path"):
        FolderDataset(None, ("a",))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ labels
def test_reduce_zero_label(tmp_path):
    """mmseg's rule: 0 -> 255 (ignore), v -> v - 1, 255 stays 255."""
    root = tmp_path / "ds"
    raw = np.array([[0, 1, 2, 3, 255, 1]], np.uint8).repeat(2, axis=0)
    _write_pair(root, "train", "a", 0, size=(6, 2))
    Image.fromarray(raw).save(root / "ann_dir/train/a.png")
    ds = describe_folder_dataset(root, classes=CLASSES, splits=["train"], reduce_zero_label=True)
    assert check_folder_dataset(ds) == {"train": 1}
    _, labels = load_folder_split(ds, "train")
    np.testing.assert_array_equal(labels[0], np.array([[255, 0, 1, 2, 255, 0]] * 2, np.uint8))
    # without the rule, value 3 is out of range for 3 classes, and the hint names the rule
    plain = describe_folder_dataset(root, classes=CLASSES, splits=["train"])
    with pytest.raises(FolderDatasetError, match=r"values 3.*reduce_zero_label=True") as info:
        check_folder_dataset(plain)
    with pytest.raises(FolderDatasetError, match="values 3"):
        load_folder_split(plain, "train")
    # with the rule, value 4 would be class 3: out of range, named by its file value
    Image.fromarray(np.array([[0, 4]], np.uint8)).save(root / "ann_dir/train/a.png")
    Image.fromarray(_image(0, size=(2, 1))).save(root / "img_dir/train/a.png")
    with pytest.raises(FolderDatasetError) as info:
        check_folder_dataset(ds)
    assert "values 4" in str(info.value) and "neither 1..3" in str(info.value)


def test_p_mode_masks_are_class_indices(tmp_path):
    root = tmp_path / "ds"
    _write_pair(root, "train", "a", 0)
    raw = _mask(0)
    pmask = Image.fromarray(raw, mode="L").convert("P")
    pmask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [7] * (256 * 3 - 9))
    pmask.save(root / "ann_dir/train/a.png")
    assert Image.open(root / "ann_dir/train/a.png").mode == "P"
    ds = describe_folder_dataset(root, classes=CLASSES, splits=["train"])
    assert check_folder_dataset(ds) == {"train": 1}
    np.testing.assert_array_equal(load_folder_split(ds, "train")[1][0], raw)


# ------------------------------------------------------------------------------ loading
def test_load_folder_split_values(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ds = describe_folder_dataset(root)
    images, labels = load_folder_split(ds, "val")
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    assert images.shape == (2, H, W, 3) and labels.shape == (2, H, W)
    np.testing.assert_array_equal(images[1], _image(4))  # val/0001 was written with seed 3 + 1
    np.testing.assert_array_equal(labels[1], _mask(4))


def test_load_folder_split_sizes(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _write_pair(root, "train", "big", 11, size=(20, 30))
    ds = describe_folder_dataset(root)
    with pytest.raises(FolderDatasetError) as info:
        load_folder_split(ds, "train")
    msg = str(info.value)
    assert "2 different sizes" in msg and "16x12 (3 images" in msg and "20x30 (1 image, e.g. big.png)" in msg
    assert "size=" in msg
    images, labels = load_folder_split(ds, "train", size=8)
    assert images.shape == (4, 8, 8, 3) and labels.shape == (4, 8, 8)
    # masks are resized with nearest: no new values appear
    assert set(np.unique(labels)) <= {0, 1, 2, 255}
    big = np.asarray(Image.open(root / "ann_dir/train/big.png"))
    np.testing.assert_array_equal(labels[3], np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.NEAREST)))
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_folder_split(ds, "train", size=0)


def test_load_folder_split_reports_bad_files(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ds = describe_folder_dataset(root)
    _rm("ann_dir/val/0000.png")(root)
    with pytest.raises(FolderDatasetError, match="img_dir/val/0000.png: image has no mask"):
        load_folder_split(ds, "val")
    _rgb_mask(root)
    _garbage("img_dir/val/0001.png")(root)
    with pytest.raises(FolderDatasetError) as info:
        load_folder_split(ds, "val")
    assert "mode RGB" in str(info.value) and "img_dir/val/0001.png: image cannot be read" in str(info.value)


# ------------------------------------------------------------------------------ export
def test_export_offline_round_trip(tmp_path):
    name = "texture_mosaic"
    dest = export_offline_as_folder(name, tmp_path / "tm64", size=64, splits=["train", "val"])
    assert dest == tmp_path / "tm64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tm64"]  # no temporary folder left
    meta = json.loads((dest / "classes.json").read_text())
    assert meta == {"classes": D.dataset_classes(name), "palette": D.dataset_palette(name)}
    ds = describe_folder_dataset(dest)
    assert ds.num_classes == len(D.dataset_classes(name)) == 8
    assert ds.palette == tuple(map(tuple, D.dataset_palette(name)))
    offline_val = D.load_offline_split(name, "val")
    counts = check_folder_dataset(ds)
    assert counts == {"train": len(D.load_offline_split(name, "train")[0]), "val": len(offline_val[0])}
    images64, labels64 = load_folder_split(ds, "val")
    assert images64.shape == (counts["val"], 64, 64, 3) and labels64.shape == (counts["val"], 64, 64)

    full = export_offline_as_folder(name, tmp_path / "full")  # all splits, files copied unchanged
    assert sorted(p.name for p in (full / "img_dir").iterdir()) == sorted(D.SPLITS)
    fds = describe_folder_dataset(full, splits=D.SPLITS)
    images, labels = load_folder_split(fds, "val")
    np.testing.assert_array_equal(images, offline_val[0])
    np.testing.assert_array_equal(labels, offline_val[1])
    # exporting at a size = loading the full-size export at that size (same resampling)
    images_r, labels_r = load_folder_split(fds, "val", size=64)
    np.testing.assert_array_equal(images_r, images64)
    np.testing.assert_array_equal(labels_r, labels64)

    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_offline_as_folder(name, dest, splits=["val"])
    (tmp_path / "empty").mkdir()
    assert export_offline_as_folder(name, tmp_path / "empty", size=32, splits=["val_blur"]) == tmp_path / "empty"
    assert check_folder_dataset(describe_folder_dataset(tmp_path / "empty", splits=["val_blur"])) == {
        "val_blur": counts["val"]}
    with pytest.raises(ValueError, match="available: train, val"):
        export_offline_as_folder(name, tmp_path / "x", splits=["test"])
    assert not (tmp_path / "x").exists()
