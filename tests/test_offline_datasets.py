"""Offline segmentation datasets built from real image content (promptmatch.datasets).

Builds each dataset once per session into a temporary root (a few seconds each). The
``nuclei`` dataset needs the stardist 0.9.2 wheel: taken from ``$PROMPTMATCH_WHEELS`` or the
default wheel directory if present, else downloaded once into the pytest cache with
``fetch_stardist_wheel`` (PyPI must be reachable then).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptmatch import datasets as D
from promptmatch.datasets import offline as O

REPO = Path(__file__).resolve().parents[1]
NAMES = ["clutter_objects", "long_tail", "nuclei", "photo_collage", "scale_objects", "texture_bands",
         "texture_mosaic", "thin_structures"]
#: the shifts that change pixels only (labels kept), with a parameter range to check
PIXEL_SHIFTS = {"colour": None, "blur": ("radius", 1.2, 2.0), "noise": ("sigma", 12, 20),
                "jpeg": ("quality", 8, 20), "gamma": ("gamma", 0.45, 2.2),
                "defocus": ("radius", 1.5, 2.5), "motion": ("length", 5.0, 9.0)}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def stardist_wheel_dir(pytestconfig, tmp_path_factory) -> Path:
    try:
        return D.find_stardist_wheel().parent
    except D.SourceNotFoundError:
        pass
    cache = getattr(pytestconfig, "cache", None)
    dest = cache.mkdir("promptmatch_stardist_wheel") if cache is not None else tmp_path_factory.mktemp("wheels")
    try:
        return D.fetch_stardist_wheel(dest).parent
    except D.OfflineDataError as exc:  # pragma: no cover - no PyPI access
        pytest.skip(f"stardist wheel not available and could not be downloaded: {exc}")


@pytest.fixture(scope="session")
def built(stardist_wheel_dir, tmp_path_factory):
    """``built(name)`` -> directory of the dataset, built once per session."""
    root = tmp_path_factory.mktemp("offline_root")
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(O.WHEELS_ENV, str(stardist_wheel_dir))
                cache[name] = D.build_offline_dataset(name, root=root)
        return cache[name]

    return get


@pytest.fixture
def no_wheels(tmp_path, monkeypatch):
    """An environment where no stardist wheel can be found (and the default cache is empty)."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    monkeypatch.setenv(O.WHEELS_ENV, str(empty))
    monkeypatch.setenv(O.CACHE_ENV, str(tmp_path / "cache"))
    return empty


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _inside(box, area, tol=1e-9) -> bool:
    return (box[0] >= area[0] - tol and box[1] >= area[1] - tol
            and box[2] <= area[2] + tol and box[3] <= area[3] + tol)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------ registry
def test_registry_and_names():
    assert D.list_offline_datasets() == NAMES
    assert set(D.OFFLINE_DATASETS) == set(NAMES)
    for name in NAMES:
        spec = D.OFFLINE_DATASETS[name]
        classes, palette = D.dataset_classes(name), D.dataset_palette(name)
        assert classes == list(spec.classes) and len(classes) == spec.num_classes >= 2
        assert len(palette) == len(classes) and len({tuple(c) for c in palette}) == len(palette)
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
        assert len(set(classes)) == len(classes)
    assert 6 <= len(D.dataset_classes("texture_mosaic")) <= 8
    assert D.dataset_classes("nuclei") == ["background", "nucleus"]
    assert D.dataset_classes("thin_structures") == ["background", "vessel", "wire"]
    assert D.dataset_classes("clutter_objects")[0] == "background"
    assert 5 <= len(D.dataset_classes("clutter_objects")) <= 6
    assert len(D.dataset_classes("long_tail")) == 16
    assert D.dataset_classes("texture_bands") == ["cell", "tissue", "moon", "gravel", "retina"]
    assert D.dataset_classes("scale_objects") == ["background", "cell", "colour_wheel", "coins", "astronaut"]
    # the first four shifts keep their positions (and so their random streams)
    assert D.SPLITS == ("train", "val", "val_colour", "val_blur", "val_noise", "val_scale",
                        "val_jpeg", "val_gamma", "val_defocus", "val_motion")
    assert set(PIXEL_SHIFTS) | {"scale"} == set(D.SHIFTS)
    # object sources are never background sources; long_tail: 16 distinct sources
    clutter = D.OFFLINE_DATASETS["clutter_objects"]
    assert not set(clutter.sources[1:]) & set(clutter.background_sources)
    assert clutter.sources[0] == clutter.background_sources[0]
    assert len(set(D.OFFLINE_DATASETS["long_tail"].sources)) == 16
    scales = D.OFFLINE_DATASETS["scale_objects"]
    assert not set(scales.sources[1:]) & set(scales.background_sources)
    assert scales.sources[0] == scales.background_sources[0]


@pytest.mark.parametrize("call", [D.dataset_classes, D.dataset_palette, D.build_offline_dataset])
def test_unknown_name_lists_available(call, tmp_path):
    with pytest.raises(ValueError, match="unknown offline dataset 'ade20k'; available: clutter_objects, "
                                         "long_tail, nuclei, photo_collage, scale_objects, texture_bands, "
                                         "texture_mosaic, thin_structures"):
        if call is D.build_offline_dataset:
            call("ade20k", root=tmp_path)
        else:
            call("ade20k")
    assert not any(tmp_path.iterdir())


def test_source_areas_are_disjoint_and_fit_the_crops():
    """The mechanism that keeps train and val apart: one train and one val area per source."""
    for key, src in O.sources._SOURCES.items():
        train, val = src.areas()
        w, h = src.size
        for area in (train, val):
            assert 0 <= area[0] < area[2] <= w and 0 <= area[1] < area[3] <= h, (key, area)
        assert not _overlap(train, val), key
        # separated by the guard band along the split axis
        gap = max(val[0] - train[2], train[0] - val[2]) if src.axis == "x" else \
            max(val[1] - train[3], train[1] - val[3])
        assert gap >= O.GUARD_PX, key
    for spec in D.OFFLINE_DATASETS.values():
        for key in spec.all_sources:
            src = O.sources._SOURCES[key]
            side = spec.crop_px[1] * src.scale
            for area in src.areas():
                assert min(area[2] - area[0], area[3] - area[1]) >= side, (spec.name, key)


# ------------------------------------------------------------------------------ built datasets
@pytest.mark.parametrize("name", NAMES)
def test_layout_labels_and_classes(built, name):
    path = built(name)
    spec = D.OFFLINE_DATASETS[name]
    meta = _meta(path)
    assert D.verify_offline_dataset(path)
    assert meta["name"] == name and meta["build_version"] == D.BUILD_VERSION
    assert meta["classes"] == D.dataset_classes(name) and meta["palette"] == D.dataset_palette(name)
    assert meta["ignore_index"] == 255 and meta["img_suffix"] == meta["seg_map_suffix"] == ".png"
    expected = {"train": spec.num_train, **{s: spec.num_val for s in D.SPLITS if s != "train"}}
    assert meta["splits"] == expected
    assert sorted(p.name for p in path.iterdir()) == ["ann_dir", "img_dir", "meta.json"]
    val_ids = sorted(p.name for p in (path / "img_dir" / "val").iterdir())
    for split, count in expected.items():
        imgs = sorted(p.name for p in (path / "img_dir" / split).iterdir())
        anns = sorted(p.name for p in (path / "ann_dir" / split).iterdir())
        assert len(imgs) == count and imgs == anns, split
        if split.startswith("val_"):
            assert imgs == val_ids, split  # shifted splits are paired with val by id
    for src in meta["sources"].values():
        assert src["licence"] and src["attribution"] and len(src["sha256"]) == 64

    num_classes = spec.num_classes
    allowed = set(range(num_classes)) | {255}
    for split in D.SPLITS:
        images, labels = D.load_offline_split(path, split)
        assert images.shape == (expected[split], 128, 128, 3) and images.dtype == np.uint8
        assert labels.shape == (expected[split], 128, 128) and labels.dtype == np.uint8
        assert set(np.unique(labels).tolist()) <= allowed, split
        present = set(np.unique(labels).tolist()) - {255}
        if split in ("train", "val"):
            assert present == set(range(num_classes)), (split, present)
        assert images.std() > 10, split  # real content, not blank
    # files are plain PNGs of the documented modes
    first = sorted((path / "img_dir" / "train").iterdir())[0]
    with Image.open(first) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (128, 128)
    with Image.open(path / "ann_dir" / "train" / first.name) as im:
        assert im.format == "PNG" and im.mode == "L"


@pytest.mark.parametrize("name", NAMES)
def test_train_and_val_crops_come_from_disjoint_areas(built, name):
    meta = _meta(built(name))
    sources = meta["sources"]
    for key, src in sources.items():
        assert not _overlap(src["train_area"], src["val_area"]), key
    used = {"train": set(), "val": set()}
    for split, samples in meta["samples"].items():
        kind = "train" if split == "train" else "val"
        assert len(samples) == meta["splits"][split]
        for sample in samples:
            assert sample["crops"], (split, sample["id"])
            for crop in sample["crops"]:
                area = sources[crop["source"]][f"{kind}_area"]
                assert _inside(crop["box"], area), (split, sample["id"], crop)
                used[kind].add(crop["source"])
    assert used["train"] == used["val"] == set(sources)
    # the zoomed split re-renders a sub-window of the same val crop
    for v, s in zip(meta["samples"]["val"], meta["samples"]["val_scale"]):
        assert v["id"] == s["id"] and 1.5 <= s["shift"]["zoom"] <= 2.0
        for cv, cs in zip(v["crops"], s["crops"]):
            assert cv["source"] == cs["source"] and _inside(cs["box"], cv["box"])
            assert (cs["box"][2] - cs["box"][0]) < (cv["box"][2] - cv["box"][0])


@pytest.mark.parametrize("name", NAMES)
def test_shifted_splits_change_images_consistently(built, name):
    path = built(name)
    meta = _meta(path)
    val_x, val_y = D.load_offline_split(path, "val")
    for shift, check in PIXEL_SHIFTS.items():
        x, y = D.load_offline_split(path, f"val_{shift}")
        np.testing.assert_array_equal(y, val_y)  # photometric shifts keep the labels
        assert np.abs(x.astype(int) - val_x).mean() > 2, shift
        if check is not None:  # the parameters drawn per image are recorded, within range
            key, lo, hi = check
            values = [s["shift"][key] for s in meta["samples"][f"val_{shift}"]]
            assert len(values) == len(val_x) and all(lo <= v <= hi for v in values), (shift, values)
    x, y = D.load_offline_split(path, "val_scale")
    assert not np.array_equal(y, val_y)
    # zooming in makes label regions larger: fewer label changes between neighbours
    edges = lambda lab: (lab[:, 1:] != lab[:, :-1]).mean()  # noqa: E731
    assert edges(y) < edges(val_y)


@pytest.mark.parametrize("shift", ["jpeg", "gamma", "defocus", "motion"])
def test_new_pixel_shifts_are_deterministic_and_keep_labels(shift):
    """The shifts added in build version 2, applied directly: same stream, same result."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img[8:24, 8:24] = 200  # some flat area and some edges
    label = (np.arange(32 * 32).reshape(32, 32) % 3).astype(np.uint8)
    rendered = (img, label, [{"source": "x"}])
    apply = O.SHIFT_REGISTRY[shift].apply
    (a, la, ca), pa = apply(None, rendered, None, np.random.default_rng(7))
    (b, lb, cb), pb = apply(None, rendered, None, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert pa == pb and json.loads(json.dumps(pa)) == pa  # recorded in meta.json as is
    assert la is label and ca == [{"source": "x"}]
    assert np.abs(a.astype(int) - img).mean() > 2
    (c, _, _), pc = apply(None, rendered, None, np.random.default_rng(8))
    assert pc != pa and not np.array_equal(c, a)
    # blur kernels (normalised) keep a flat image as it is, JPEG keeps it flat; gamma keeps
    # black and white
    flat = (np.full((16, 16, 3), 90, np.uint8), label[:16, :16], [])
    (f, _, _), _ = apply(None, flat, None, np.random.default_rng(7))
    if shift in ("defocus", "motion"):
        assert (f == 90).all()
    if shift == "jpeg":
        assert np.ptp(f) <= 2 and abs(f.mean() - 90) <= 4
    if shift == "gamma":
        ends = (np.array([[[0, 255, 0]]], np.uint8), label[:1, :1], [])
        assert apply(None, ends, None, np.random.default_rng(7))[0][0].tolist() == [[[0, 255, 0]]]


def _label_stats(path: Path, split: str, num_classes: int):
    """Pixel share per class and number of images holding each class."""
    _, labels = D.load_offline_split(path, split)
    share = np.bincount(labels.ravel(), minlength=num_classes) / labels.size
    images = np.array([(labels == c).any(axis=(1, 2)).sum() for c in range(num_classes)])
    return labels, share, images


def test_long_tail_class_distribution(built):
    """Zipf-like: a dominant head, the rarest classes well under 2% of the training pixels,
    yet every class in several training images and in the validation set."""
    spec = D.OFFLINE_DATASETS["long_tail"]
    weights = np.asarray(spec.class_weights)
    assert np.all(np.diff(weights) < 0) and abs(weights.sum() - 1) < 1e-9
    path = built("long_tail")
    _, share, images = _label_stats(path, "train", 16)
    assert share[0] > 0.3 and share[:4].sum() > 0.6 and share[-4:].sum() < 0.06
    assert np.sort(share)[:3].max() < 0.015, share  # the rarest: well under 2%
    assert images.min() >= 5, images
    _, _, val_images = _label_stats(path, "val", 16)
    assert val_images.min() >= 1, val_images
    assert _meta(path)["class_weights"] == list(spec.class_weights)


def test_thin_structures_are_thin(built):
    """Vessels and wires cover 3-12% of the pixels in all, every image has both, and they
    are thin: an erosion by a 5x5 square removes (almost) all of them."""
    labels, share, images = _label_stats(built("thin_structures"), "train", 3)
    assert 0.03 <= share[1:].sum() <= 0.12, share
    assert share[1] > 0.01 and share[2] > 0.01
    assert (images == len(labels)).all()
    per_image = (labels > 0).mean(axis=(1, 2))
    assert per_image.min() > 0.01 and per_image.max() < 0.2
    windows = np.lib.stride_tricks.sliding_window_view
    for cls in (1, 2):
        thin = labels == cls
        eroded = windows(np.pad(thin, ((0, 0), (2, 2), (2, 2))), (5, 5), axis=(1, 2)).all(axis=(-1, -2))
        assert eroded.sum() < 0.02 * thin.sum(), cls


def test_clutter_objects_are_small_objects_on_clutter(built):
    path = built("clutter_objects")
    labels, share, images = _label_stats(path, "train", 6)
    assert 0.8 < share[0] < 0.97, share  # objects are small
    assert (share[1:] > 0.005).all()
    assert images[0] == len(labels) and ((labels > 0).any(axis=(1, 2))).all()
    assert (labels > 0).mean(axis=(1, 2)).max() < 0.5
    meta = _meta(path)
    spec = D.OFFLINE_DATASETS["clutter_objects"]
    assert meta["class_sources"]["background"] == list(spec.background_sources)
    for sample in meta["samples"]["train"]:  # background crops come from background sources only
        for crop in sample["crops"]:
            assert (crop["class"] == "background") == (crop["source"] in spec.background_sources), crop


def _scenes(name: str, split: str = "train", count: int = 24):
    """The first ``count`` scenes of a split, drawn as the build draws them (no rendering)."""
    spec = D.OFFLINE_DATASETS[name]
    area_idx = 0 if split == "train" else 1
    areas = {k: O.sources._SOURCES[k].areas()[area_idx] for k in spec.all_sources}
    stream = O.build._TRAIN_STREAM if split == "train" else O.build._VAL_STREAM
    make = O.scenes._SCENE_MAKERS[spec.kind]
    return [make(spec, O.build._rng(spec, stream, i), i, areas) for i in range(count)]


def _closure(fn) -> dict:
    """The variables a nested function closes over, by name."""
    return {k: c.cell_contents for k, c in zip(fn.__code__.co_freevars, fn.__closure__)}


def test_texture_bands_are_narrow_bands_of_distinct_neighbours(built):
    """No background class; every image shows several textures, many pixels lie near a band
    edge, and neighbouring bands always have different classes."""
    labels, share, images = _label_stats(built("texture_bands"), "train", 5)
    assert (share > 0.1).all() and (share < 0.3).all(), share
    assert (images > 0.8 * len(labels)).all(), images
    assert all(len(np.unique(lab)) >= 2 for lab in labels)
    change = (labels[:, 1:, 1:] != labels[:, :-1, 1:]) | (labels[:, 1:, 1:] != labels[:, 1:, :-1])
    near = np.lib.stride_tricks.sliding_window_view(np.pad(change, ((0, 0), (4, 4), (4, 4))), (9, 9),
                                                    axis=(1, 2)).any(axis=(-1, -2))
    assert near.mean() > 0.3, near.mean()  # within about 4 px of a band edge
    for i, scene in enumerate(_scenes("texture_bands", count=12)):
        classes = _closure(scene.geometry)["cls_arr"]  # class of every band, in order across
        assert len(classes) >= 4 and (classes[1:] != classes[:-1]).all(), classes
        assert scene.geometry(np.array([0.5]), np.array([0.5]))[0] == i % 5  # cycles with the index


def test_scale_objects_span_a_wide_range_of_sizes(built):
    path = built("scale_objects")
    labels, share, images = _label_stats(path, "train", 5)
    assert 0.6 < share[0] < 0.9 and (share[1:] > 0.02).all(), share
    assert images[0] == len(labels) and ((labels > 0).any(axis=(1, 2))).all()
    spec = D.OFFLINE_DATASETS["scale_objects"]
    for sample in _meta(path)["samples"]["train"]:
        crops = sample["crops"]
        assert crops[0]["class"] == "background" and crops[0]["source"] in spec.background_sources
        assert 3 <= len(crops) - 1 <= 9 and all(c["class"] != "background" for c in crops[1:])
    # object areas at 128 px (before smaller ones cover them): from a few pixels to thousands
    u, v = O.canvas._canvas_grid(O.canvas._FULL_VIEW, O.IMAGE_SIZE)
    areas = np.asarray([O.canvas._shape_mask(sh, u, v).sum() for scene in _scenes("scale_objects")
                        for sh in _closure(scene.geometry)["shapes"]])
    assert areas.min() < 60 and areas.max() > 3000 and np.median(areas) < 1000, areas


def test_second_call_returns_cached_dataset_without_rewriting(built):
    path = built("texture_mosaic")
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    again = D.build_offline_dataset("texture_mosaic", root=path.parent)
    assert again == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before


def test_build_is_deterministic(built, stardist_wheel_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(O.WHEELS_ENV, str(stardist_wheel_dir))
    for name in NAMES:
        first = built(name)
        second = D.build_offline_dataset(name, root=tmp_path / "other_root")
        assert second != first
        m1, m2 = _meta(first), _meta(second)
        assert m1["files"] == m2["files"] and m1["content_sha256"] == m2["content_sha256"]
        assert (first / "meta.json").read_bytes() == (second / "meta.json").read_bytes()
        assert len(m1["files"]) == 2 * sum(m1["splits"].values())


def test_corruption_is_detected_and_rebuilt(built, stardist_wheel_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(O.WHEELS_ENV, str(stardist_wheel_dir))
    path = tmp_path / "nuclei"
    shutil.copytree(built("nuclei"), path)
    reference = _meta(path)["files"]
    assert D.verify_offline_dataset(path)

    victim = path / "img_dir" / "val" / "0003.png"
    victim.write_bytes(victim.read_bytes()[:-20] + b"\0" * 20)
    assert not D.verify_offline_dataset(path)
    assert O.build._problems(path) == ["img_dir/val/0003.png is corrupt (sha256 mismatch)"]
    (tmp_path / ".nuclei.tmp-deadbeef" / "img_dir").mkdir(parents=True)  # left by a killed build
    (tmp_path / ".nuclei.old-deadbeef").mkdir()
    with caplog.at_level("WARNING", logger=O.__name__):
        assert D.build_offline_dataset("nuclei", root=tmp_path) == path
    assert "failed verification" in caplog.text and "0003.png" in caplog.text
    assert D.verify_offline_dataset(path) and _meta(path)["files"] == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == [".nuclei.lock", "nuclei"]  # stale dirs removed

    (path / "ann_dir" / "train" / "0000.png").unlink()
    assert O.build._problems(path) == ["ann_dir/train/0000.png is missing"]
    (path / "ann_dir" / "train" / "0000.png").write_bytes(b"")
    shutil.copy(path / "img_dir" / "val" / "0000.png", path / "img_dir" / "val" / "9999.png")
    assert any("9999.png is not in the manifest" in p for p in O.build._problems(path, limit=10))
    D.build_offline_dataset("nuclei", root=tmp_path)
    assert D.verify_offline_dataset(path) and not (path / "img_dir" / "val" / "9999.png").exists()

    meta = _meta(path)
    meta["classes"] = ["a", "b"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert not D.verify_offline_dataset(path)
    assert "modified" in O.build._problems(path)[0]
    (path / "meta.json").write_text("{not json")
    assert not D.verify_offline_dataset(path)
    assert not D.verify_offline_dataset(tmp_path / "does_not_exist")


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(*args):
        raise KeyboardInterrupt("simulated interruption")

    noise = dataclasses.replace(O.SHIFT_REGISTRY["noise"], apply=boom)
    monkeypatch.setattr(O.build, "SHIFT_REGISTRY", {**O.SHIFT_REGISTRY, "noise": noise})
    with pytest.raises(KeyboardInterrupt):
        D.build_offline_dataset("texture_mosaic", root=tmp_path)
    assert not (tmp_path / "texture_mosaic").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".texture_mosaic.lock"]  # temp dir removed


# ------------------------------------------------------------------------------ stardist wheel
def test_missing_stardist_wheel_gives_the_download_command(no_wheels, tmp_path):
    with pytest.raises(D.SourceNotFoundError) as info:
        D.build_offline_dataset("nuclei", root=tmp_path / "data")
    msg = str(info.value)
    assert f"python -m pip download --no-deps stardist==0.9.2 -d {no_wheels}" in msg
    assert "fetch_stardist_wheel" in msg and O.WHEELS_ENV in msg
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / "data" / "nuclei").exists()
    assert not list((tmp_path / "data").glob(".nuclei.tmp-*"))
    with pytest.raises(D.SourceNotFoundError):
        D.find_stardist_wheel()


def test_wheel_is_found_in_env_dir_or_as_file(stardist_wheel_dir, no_wheels, monkeypatch):
    wheel = next(stardist_wheel_dir.glob("stardist-0.9.2-*.whl"))
    monkeypatch.setenv(O.WHEELS_ENV, os.pathsep.join([str(no_wheels), str(wheel)]))
    assert D.find_stardist_wheel() == wheel
    monkeypatch.setenv(O.WHEELS_ENV, str(stardist_wheel_dir))
    assert D.find_stardist_wheel() == wheel
    # fetch is a no-op (no network) when the wheel is already there
    assert D.fetch_stardist_wheel(stardist_wheel_dir) == wheel


def test_wrong_stardist_wheel_content_is_rejected(no_wheels, tmp_path):
    fake = no_wheels / "stardist-0.9.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("stardist/data/images/img2d.tif", b"not the image")
        zf.writestr("stardist/data/images/mask2d.tif", b"not the mask")
    with pytest.raises(D.SourceChecksumError, match="img2d.tif .* has sha256"):
        D.build_offline_dataset("nuclei", root=tmp_path / "data")
    assert not (tmp_path / "data" / "nuclei").exists()


def test_missing_matplotlib_gives_the_install_command(monkeypatch, tmp_path):
    """scale_objects reads a matplotlib sample image; the package is located, never imported."""
    real = O.sources.importlib.machinery.PathFinder

    class NoMatplotlib:
        @staticmethod
        def find_spec(name, *args):
            return None if name == "matplotlib" else real.find_spec(name, *args)

    monkeypatch.setattr(O.sources, "importlib", types.SimpleNamespace(
        machinery=types.SimpleNamespace(PathFinder=NoMatplotlib)))
    with pytest.raises(D.SourceNotFoundError, match="python -m pip install matplotlib"):
        D.build_offline_dataset("scale_objects", root=tmp_path / "data")
    assert not (tmp_path / "data" / "scale_objects").exists()


# ------------------------------------------------------------------------------ consumers
def test_mmseg_dataset_config(built):
    path = built("photo_collage")
    cfg = D.mmseg_dataset_config(path, "val_blur")
    assert cfg["type"] == "BaseSegDataset" and cfg["data_root"] == str(path)
    assert cfg["data_prefix"] == {"img_path": "img_dir/val_blur", "seg_map_path": "ann_dir/val_blur"}
    assert cfg["metainfo"]["classes"] == tuple(D.dataset_classes("photo_collage"))
    assert cfg["reduce_zero_label"] is False and cfg["ignore_index"] == 255
    with pytest.raises(ValueError, match="unknown split"):
        D.mmseg_dataset_config(path, "test")
    with pytest.raises(ValueError, match="neither an offline dataset"):
        D.load_offline_split(path.parent / "nope", "val")


def test_default_roots_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(O.DATA_ENV, raising=False)
    monkeypatch.setenv(O.CACHE_ENV, str(tmp_path / "c"))
    assert D.default_data_root() == tmp_path / "c" / "datasets"
    assert D.default_wheel_dir() == tmp_path / "c" / "wheels"
    monkeypatch.setenv(O.DATA_ENV, str(tmp_path / "d"))
    assert D.default_data_root() == tmp_path / "d"
    monkeypatch.delenv(O.CACHE_ENV)
    assert D.default_wheel_dir() == Path.home() / ".cache" / "promptmatch" / "wheels"


def test_import_and_build_are_silent_and_light(tmp_path, no_wheels):
    """No mmseg/mmcv/mmengine and no scikit-image or matplotlib import (their data files are
    read directly); the scikit-image and matplotlib datasets need no stardist wheel."""
    code = (
        "import sys, logging\n"
        "for m in ('mmseg', 'mmcv', 'mmengine', 'skimage', 'stardist', 'tifffile', 'matplotlib'):\n"
        "    sys.modules[m] = None  # importing any of them would now fail\n"
        "import dataclasses\n"
        "import promptmatch.datasets as D\n"
        "from promptmatch.datasets import offline as O\n"
        "small = {n: dataclasses.replace(O.OFFLINE_DATASETS[n], num_train=8, num_val=4)\n"
        "         for n in ('photo_collage', 'scale_objects')}\n"
        "O.specs.OFFLINE_DATASETS = {**O.OFFLINE_DATASETS, **small}  # same code, fewer scenes\n"
        "for n in small:\n"
        f"    p = D.build_offline_dataset(n, root={str(tmp_path)!r})\n"
        "    assert D.verify_offline_dataset(p)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")  # carries no_wheels' env
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)


def test_render_as_folder_matches_the_build_at_its_size_and_renders_larger(built, tmp_path):
    """render_offline_as_folder draws the same scenes: at the built-in size it equals the
    built dataset pixel for pixel; at 2x it is a folder dataset of the same scenes at 256 px."""
    from promptmatch.datasets import (
        check_folder_dataset, describe_folder_dataset, load_folder_split, load_offline_split,
        render_offline_as_folder,
    )

    same = render_offline_as_folder("nuclei", tmp_path / "same", O.IMAGE_SIZE, splits=["val"])
    imgs, labels = load_folder_split(describe_folder_dataset(same, splits=("val",)), "val")
    ref_imgs, ref_labels = load_offline_split(built("nuclei"), "val")
    assert np.array_equal(imgs, ref_imgs) and np.array_equal(labels, ref_labels)
    big = render_offline_as_folder("nuclei", tmp_path / "big", 2 * O.IMAGE_SIZE, splits=["val"])
    fd = describe_folder_dataset(big, splits=("val",))
    assert fd.classes == tuple(O.dataset_classes("nuclei"))
    assert check_folder_dataset(fd) == {"val": len(ref_labels)}
    big_imgs, big_labels = load_folder_split(fd, "val")
    assert big_labels.shape[1:] == (256, 256)
    # the same layout: the 256 px labels, taken every other pixel, mostly agree with the 128 px ones
    assert (big_labels[:, ::2, ::2] == ref_labels).mean() > 0.9
    with pytest.raises(FileExistsError):
        render_offline_as_folder("nuclei", big, 64)
