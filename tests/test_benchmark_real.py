"""The real-data benchmark: folder and mmseg_config datasets through the command line on both
engines (memory and mmengine), domain-shift pairs, shards, bad data caught before training,
per-method learning-rate sweeps on a held-out part of the training split, and CPU bf16.

Everything runs on tiny random-init timm models (``test_resnet``), 64 px images and 2 steps.
That promptmatch's in-memory mIoU agrees with mmseg's IoUMetric on fixed predictions is
tested in ``tests/test_mmseg_metrics.py``; here the two engines only run end to end.
"""
from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch.benchmark import cell as cell_mod
from promptmatch.benchmark import runner as runner_mod
from promptmatch.benchmark.data import DataProblemsError, check_spec_data, memory_tensors
from promptmatch.training import holdout_split

CLASSES = ["background", "thing", "stuff"]
SIZE = 64
BASE = {"image_size": SIZE, "steps": 2, "batch": 2, "warmup": 1, "eval_batch": 4, "latency_images": 1,
        "workers": 0}
SLIDE = {"eval_mode": "slide", "eval_crop": 48, "eval_stride": 32}


# ----------------------------------------------------------------------------- helpers
def write_folder(root, n_train=6, n_val=3, seed=0, classes=CLASSES, size=SIZE):
    """A folder dataset in mmseg's layout: ``img_dir/{train,val}/*.png`` (RGB) and
    ``ann_dir/{train,val}/*.png`` (class indices; a few pixels 255 = ignore), ``classes.json``.
    (3 val images, not 2: see test_mmengine_latency_with_a_two_image_val_split.)"""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (len(classes), 3))
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            cells = rng.integers(0, len(classes), (4, 4))
            mask = np.kron(cells, np.ones((size // 4, size // 4), dtype=np.int64)).astype(np.uint8)
            mask[:2, :2] = 255
            img = np.clip(palette[mask % len(classes)] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "img_dir" / split / f"{i:04d}.png")
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i:04d}.png")
    (root / "classes.json").write_text(json.dumps(classes))
    return root


def write_ade(root, n_train=4, n_val=2):
    """A tiny ADE20K-layout folder: ``images/{training,validation}/*.jpg``,
    ``annotations/{training,validation}/*.png`` with values 0..150 (0: ignore under
    ADE20K's reduce_zero_label)."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(rng.integers(0, 151, (40, 56), dtype=np.uint8)).save(
                root / "annotations" / split / f"ADE_{i}.png")
    return root


def make_spec(datasets, methods=("linear",), seeds=(0,), name="real", **settings):
    return {"name": name, "methods": list(methods), "backbones": [{"name": "test_resnet"}],
            "datasets": list(datasets), "settings": {**BASE, **settings}, "seeds": list(seeds)}


def cli(tmp_path, spec, *args):
    """``python -m promptmatch.benchmark --spec <spec> ...`` in this process; its exit code."""
    path = tmp_path / f"spec_{spec['name']}_{len(list(tmp_path.glob('spec_*.json')))}.json"
    path.write_text(json.dumps(spec))
    return bm.main(["--spec", str(path), "--no-progress", *args])


def records(out):
    return bm.ResultStore(out / "results.jsonl").load()


def cell_dirs(out):
    return sorted(p.name for p in (out / "cells").iterdir()) if (out / "cells").is_dir() else []


@pytest.fixture
def in_process(monkeypatch):
    """The command line's cells run in this process (a child process per cell would import
    torch, timm and mmseg again each time: too slow for a 2-core test run). The record is the
    one a failed child gives, with the traceback, if a cell raises."""
    def run(cell, timeout_s=None, work_dir=None, prior=None):
        try:
            return bm.run_cell(cell, work_dir=work_dir, prior=prior)
        except Exception:
            return bm.error_record(cell, traceback.format_exc()[-4000:], 0.0)

    monkeypatch.setattr(runner_mod, "run_cell_in_child", run)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "mine")


def _ok(rec):
    assert rec["status"] == "ok", rec.get("reason", "")[-3000:]


def _check_ok_record(rec, classes, splits=("val",)):
    _ok(rec)
    assert set(rec["miou"]) == set(splits) and set(rec["per_class_iou"]) == set(splits)
    for sp in splits:
        assert 0.0 <= rec["miou"][sp] <= 1.0 and math.isfinite(rec["miou"][sp])
        assert set(rec["per_class_iou"][sp]) == set(classes)  # the store writes keys sorted
        assert all(v is None or 0.0 <= v <= 1.0 for v in rec["per_class_iou"][sp].values())
    assert rec["trainable_params"] > 0
    for k in ("step_time_median_s", "throughput_img_s", "latency_ms_median", "peak_mem_mb", "wall_s"):
        assert isinstance(rec[k], float) and math.isfinite(rec[k]) and rec[k] >= 0, (k, rec.get(k))
    assert rec["step_time_median_s"] > 0 and rec["latency_ms_median"] > 0


# ----------------------------------------------------------------------------- 1. folder, both engines
@pytest.mark.parametrize("engine", ["memory", pytest.param("mmengine", marks=pytest.mark.slow)])
def test_folder_dataset_end_to_end_through_cli(engine, folder, tmp_path, in_process):
    if engine == "mmengine":
        pytest.importorskip("mmseg")

    spec = make_spec([{"name": "mine", "folder": str(folder)}], methods=["linear", "lora", "spm"],
                     engine=engine, **SLIDE)
    out = tmp_path / "out"
    assert cli(tmp_path, spec, "--out", str(out)) == 0
    recs = records(out)
    assert [r["method"] for r in recs] == ["linear", "lora", "spm"]
    assert {r["key"] for r in recs} == {c.key for c in bm.expand_grid(bm.validate_spec(spec))}
    for rec in recs:
        _check_ok_record(rec, CLASSES)
        assert rec["engine"] == engine and rec["settings"]["engine"] == engine
        assert rec["settings"]["eval_mode"] == "slide" and "slide48/32" in rec["setting_label"]
        assert rec["checkpoint_bytes"] > 0
        meta = pm.read_prompt_metadata(rec["checkpoint"])  # the cell's prompt checkpoint, kept in its folder
        assert meta["method"] == rec["method"] and meta["class_names"] == CLASSES
        if engine == "memory":
            ran = json.loads(Path(rec["config_file"]).read_text())  # what the cell ran
            assert ran["method"] == rec["method"] and ran["lr"] == rec["lr_used"]
            continue
        from mmengine.config import Config

        cfg = Config.fromfile(rec["config_file"])  # the config it ran, loadable on its own
        assert cfg.model.type == "promptmatch.PromptEncoderDecoder" and cfg.model.method == rec["method"]
        assert cfg.model.test_cfg == dict(mode="slide", crop_size=(48, 48), stride=(32, 32))
        assert cfg.train_dataloader.dataset.data_root == str(folder)
        assert cfg.train_cfg.max_iters == 2
        meta = pm.read_prompt_metadata(rec["checkpoint"])
        assert meta["method"] == rec["method"] and meta["class_names"] == CLASSES
        assert meta["backbone"]["architecture"] == "test_resnet"
    assert len(cell_dirs(out)) == 3
    report = (out / "report.md").read_text()
    assert "## mine" in report and "| spm |" in report and "| lora |" in report


@pytest.mark.slow
def test_tools_benchmark_subprocess_runs_cells_in_child_processes(folder, tmp_path):
    """Once for real: ``tools/benchmark.py`` in a subprocess, the cell in a child process of its own."""
    pytest.importorskip("mmseg")
    repo = Path(__file__).resolve().parents[1]
    spec = make_spec([{"name": "mine", "folder": str(folder)}], engine="mmengine", **SLIDE)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(repo / "tools" / "benchmark.py"), "--spec", str(tmp_path / "spec.json"),
                           "--out", str(out), "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = records(out)
    _check_ok_record(rec, CLASSES)
    assert rec["peak_mem_kind"] == "cpu peak RSS - baseline"  # measured in the cell's own process
    assert Path(rec["config_file"]).parent == runner_mod.cell_dir(out, bm.expand_grid(bm.validate_spec(spec))[0])
    assert Path(rec["checkpoint"]).stat().st_size > 0 and (out / "report.md").is_file()


# ----------------------------------------------------------------------------- 2. mmseg_config dataset
def test_mmseg_config_dataset_with_data_root(tmp_path):
    pytest.importorskip("mmseg")
    from mmengine.config import Config

    root = write_ade(tmp_path / "ade")
    spec = bm.validate_spec(make_spec([{"name": "ade20k", "mmseg_config": "mmseg::_base_/datasets/ade20k.py",
                                        "data_root": str(root)}], warmup=0))
    (cell,) = bm.expand_grid(spec)
    assert cell.settings["engine"] == "mmengine"  # an mmseg_config dataset runs on mmengine by default
    (rec,) = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    _ok(rec)
    assert set(rec["miou"]) == {"val"} and 0.0 <= rec["miou"]["val"] <= 1.0
    per_class = rec["per_class_iou"]["val"]
    assert len(per_class) == 150 and "wall" in per_class
    cfg = Config.fromfile(rec["config_file"])
    assert cfg.train_dataloader.dataset.data_root == str(root)
    crop = [t for t in cfg.train_dataloader.dataset.pipeline if t["type"] == "RandomCrop"]
    assert crop and tuple(crop[0]["crop_size"]) == (SIZE, SIZE)  # image_size replaces ADE's 512 crop


def test_mmengine_latency_with_a_two_image_val_split(tmp_path):
    pytest.importorskip("mmseg")
    root = write_folder(tmp_path / "two_val", n_train=4, n_val=2)
    spec = bm.validate_spec(make_spec([{"name": "mine", "folder": str(root)}], engine="mmengine", warmup=0))
    (rec,) = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    _ok(rec)
    assert math.isfinite(rec["latency_ms_median"]) and rec["latency_ms_median"] > 0


# ----------------------------------------------------------------------------- 3. domain shift
@pytest.mark.parametrize("engine", ["memory", pytest.param("mmengine", marks=pytest.mark.slow)])
def test_domain_shift_pair(engine, tmp_path):
    if engine == "mmengine":
        pytest.importorskip("mmseg")
    a = write_folder(tmp_path / "A", seed=1)
    b = write_folder(tmp_path / "B", seed=2, n_train=2)
    spec = bm.validate_spec(make_spec([{"name": "A", "folder": str(a), "eval_on": ["B"]},
                                       {"name": "B", "folder": str(b), "eval_only": True}], engine=engine))
    cells = bm.expand_grid(spec)
    assert len(cells) == 1 and cells[0].dataset["name"] == "A"
    assert [t["name"] for t in cells[0].dataset["targets"]] == ["B"]
    out = tmp_path / "out"
    (rec,) = bm.run_benchmark(spec, out, progress=False, isolate=False)
    _check_ok_record(rec, CLASSES, splits=("val", "B:val"))
    assert rec["dataset"] == "A" and rec["eval_on"] == ["B"]
    assert re.fullmatch(r"A@[0-9a-f]{8}->B@[0-9a-f]{8}", json.loads(rec["key"])["dataset"])
    report = (out / "report.md").read_text()
    assert "→B:val" in report
    assert "## B" not in report  # B is only evaluated on


# ----------------------------------------------------------------------------- 4. shards
@pytest.mark.slow
def test_shards_of_a_folder_grid_cover_it_and_merge(folder, tmp_path, in_process):
    pytest.importorskip("mmseg")
    spec = make_spec([{"name": "mine", "folder": str(folder)}], methods=["linear", "lora", "spm"],
                     engine="mmengine")
    keys = [c.key for c in bm.expand_grid(bm.validate_spec(spec))]
    assert len(keys) == len(set(keys)) == 3
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert cli(tmp_path, spec, "--out", str(a), "--shard", "0/2") == 0
    assert cli(tmp_path, spec, "--out", str(b), "--shard", "1/2") == 0
    ka, kb = [r["key"] for r in records(a)], [r["key"] for r in records(b)]
    assert ka == keys[0::2] and kb == keys[1::2] and not set(ka) & set(kb)
    assert all(r["status"] == "ok" for r in records(a) + records(b))
    assert len(cell_dirs(a)) == 2 and len(cell_dirs(b)) == 1 and not set(cell_dirs(a)) & set(cell_dirs(b))
    assert cli(tmp_path, spec, "--out", str(a), "--shard", "0/2") == 0  # finished: nothing runs again
    assert len(records(a)) == 2
    assert bm.main(["--report-only", "--out", str(merged), "--merge", str(a), str(b)]) == 0
    assert sorted(r["key"] for r in records(merged)) == sorted(keys)
    assert (merged / "report.md").is_file()
    assert bm.main(["--report-only", "--out", str(merged), "--merge", str(a), str(b)]) == 0  # idempotent
    assert len(records(merged)) == 3


# ----------------------------------------------------------------------------- 5. bad data
def _rm(p):
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _truncate(p):
    p.write_bytes(p.read_bytes()[:60])


BAD_CASES = {
    "missing_val": (lambda r: (_rm(r / "img_dir" / "val"), _rm(r / "ann_dir" / "val")),
                    ["missing folder", "img_dir/val"]),
    "image_without_mask": (lambda r: _rm(r / "ann_dir" / "train" / "0001.png"),
                           ["img_dir/train/0001.png: image has no mask"]),
    "mask_without_image": (lambda r: _rm(r / "img_dir" / "train" / "0002.png"),
                           ["ann_dir/train/0002.png: mask has no image"]),
    "size_mismatch": (lambda r: Image.fromarray(np.zeros((32, 32), np.uint8)).save(r / "ann_dir" / "val" / "0000.png"),
                      ["ann_dir/val/0000.png: mask size differs", "32x32"]),
    "label_out_of_range": (lambda r: Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(
        r / "ann_dir" / "train" / "0003.png"), ["ann_dir/train/0003.png", "label values", "7"]),
    "corrupt_image": (lambda r: (r / "img_dir" / "train" / "0004.png").write_bytes(b"not an image at all"),
                      ["img_dir/train/0004.png: image cannot be read"]),
    "truncated_image": (lambda r: _truncate(r / "img_dir" / "train" / "0004.png"),
                        ["img_dir/train/0004.png: image cannot be read"]),
    "empty_train": (lambda r: [_rm(p) for d in ("img_dir", "ann_dir") for p in (r / d / "train").iterdir()],
                    ["img_dir/train", "split has no images"]),
    "two_problems": (lambda r: (_rm(r / "ann_dir" / "train" / "0001.png"),
                                Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8)).save(r / "ann_dir" / "val" / "0001.png")),
                     ["img_dir/train/0001.png: image has no mask", "ann_dir/val/0001.png", "label values"]),
}


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any cell starts (in this process or a child)."""
    def refuse(*a, **k):
        raise AssertionError("a cell was run although the data is bad")

    for name in ("run_cell", "run_cell_in_child"):
        monkeypatch.setattr(runner_mod, name, refuse)


@pytest.mark.parametrize("case", list(BAD_CASES) + ["mmseg_data_root_missing", "bad_folder_and_missing_root",
                                                   "eval_on_classes_differ"])
def test_bad_data_is_reported_before_any_training(case, tmp_path, capsys, no_training):
    root = write_folder(tmp_path / "mine", n_train=6, n_val=2)
    datasets = [{"name": "mine", "folder": str(root)}]
    n_listed = (1,)  # every problem of one folder comes as one entry ("folder dataset ... has N problem(s)")
    if case in BAD_CASES:
        damage, expected = BAD_CASES[case]
        damage(root)
        if case == "two_problems":
            expected = expected + ["has 2 problem(s)"]
    elif case in ("mmseg_data_root_missing", "bad_folder_and_missing_root"):
        pytest.importorskip("mmseg")
        missing = tmp_path / "no" / "ade"
        datasets.append({"name": "ade", "mmseg_config": "mmseg::_base_/datasets/ade20k.py",
                         "data_root": str(missing)})
        expected = ["dataset 'ade' (", "train", "val", f"data_root {missing} does not exist"]
        n_listed = (1, 2)  # the train and val loaders share the root: listed once or per loader
        if case == "bad_folder_and_missing_root":
            BAD_CASES["image_without_mask"][0](root)
            expected += BAD_CASES["image_without_mask"][1]
            n_listed = (2, 3)
    else:
        other = write_folder(tmp_path / "two", classes=["a", "b"], n_train=2)
        datasets = [dict(datasets[0], eval_on=["two"]), {"name": "two", "folder": str(other), "eval_only": True}]
        expected = ["'mine' is evaluated on 'two'", "3 and 2 classes"]
    spec = make_spec(datasets)

    # --validate lists every problem, exit code 2
    assert cli(tmp_path, spec, "--validate") == 2
    err = capsys.readouterr().err
    assert any(f"{n} data problem(s)" in err for n in n_listed), err
    for text in expected:
        assert text in err, (text, err)

    # a run stops before any training, with exit code 2 and the same message
    out = tmp_path / "out"
    assert cli(tmp_path, spec, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert any(f"{n} data problem(s), nothing was trained" in err for n in n_listed), err
    for text in expected:
        assert text in err, (text, err)
    assert not (out / "results.jsonl").exists() or records(out) == []
    assert not (out / "cells").exists()

    # the Python API raises DataProblemsError with the list
    with pytest.raises(DataProblemsError) as info:
        bm.run_benchmark(bm.validate_spec(spec), tmp_path / "api", progress=False, isolate=False)
    assert len(info.value.problems) in n_listed
    assert all(text in str(info.value) for text in expected)
    assert not (tmp_path / "api" / "cells").exists() and not (tmp_path / "api" / "results.jsonl").exists()


def test_truncated_jpeg_is_caught_before_training(tmp_path, capsys):
    root = write_folder(tmp_path / "mine")
    for p in sorted((root / "img_dir").rglob("*.png")):  # a JPEG dataset
        with Image.open(p) as im:
            im.convert("RGB").save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    bad = root / "img_dir" / "train" / "0004.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    with pytest.raises(OSError, match="truncated"):  # PIL cannot decode it (and mmcv.imread gives None)
        with Image.open(bad) as im:
            im.load()
    spec = make_spec([{"name": "mine", "folder": str(root)}])
    assert cli(tmp_path, spec, "--validate") == 2
    assert "img_dir/train/0004.jpg: image cannot be read" in capsys.readouterr().err


def test_cli_reports_an_engine_that_cannot_load_the_dataset(tmp_path, capsys):
    spec = make_spec([{"name": "ade", "mmseg_config": "mmseg::_base_/datasets/ade20k.py",
                       "data_root": str(write_ade(tmp_path / "ade"))}], engine="memory")
    with pytest.raises(bm.SpecError, match="memory engine cannot load the mmseg_config dataset"):
        bm.expand_grid(bm.validate_spec(spec))
    assert cli(tmp_path, spec, "--validate") == 2
    assert "memory engine cannot load" in capsys.readouterr().err


def test_training_split_too_small_for_the_holdout_is_a_data_problem(tmp_path, capsys, no_training):
    root = write_folder(tmp_path / "small", n_train=2)
    spec = make_spec([{"name": "small", "folder": str(root)}], engine="memory", lr={"default": [1e-3, 1e-2]},
                     holdout=0.2)
    with pytest.raises(ValueError, match="nothing held out"):
        holdout_split(2, 0.2)
    assert cli(tmp_path, spec, "--validate") == 2
    assert "held out" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. lr sweeps
SWEEP = {"default": [1e-3, 1e-2], "full": [1e-4, 1e-3]}


def test_lr_sweep_memory_engine_picks_on_held_out_part(folder, tmp_path, monkeypatch):
    import promptmatch.training as training

    calls = []
    real_train, real_eval = training.train_segmentor, training.evaluate_segmentor

    def train(model, images, labels, steps, batch, lr, *a, **k):
        calls.append(("train", images.clone(), float(lr)))
        return real_train(model, images, labels, steps, batch, lr, *a, **k)

    def evaluate(model, images, labels, *a, **k):
        res = real_eval(model, images, labels, *a, **k)
        calls.append(("eval", images.clone(), res[0]))
        return res

    monkeypatch.setattr(training, "train_segmentor", train)
    monkeypatch.setattr(training, "evaluate_segmentor", evaluate)
    entry = {"name": "mine", "folder": str(folder)}
    spec = bm.validate_spec(make_spec([entry], methods=["linear", "full"], engine="memory", lr=SWEEP, holdout=0.25))
    recs = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)

    stats = pm.input_normalisation(spec.backbones[0]["name"])  # the cells normalise with the backbone's
    x, _ = memory_tensors(spec.datasets[0], "train", SIZE, stats)
    xval, _ = memory_tensors(spec.datasets[0], "val", SIZE, stats)
    tr, ho = holdout_split(len(x), 0.25, seed=0)
    assert (tr, ho) == holdout_split(len(x), 0.25, seed=0)  # deterministic
    assert len(ho) == round(0.25 * len(x)) and not set(tr) & set(ho) and sorted(tr + ho) == list(range(len(x)))

    per_cell = len(calls) // 2
    for rec, mine in zip(recs, (calls[:per_cell], calls[per_cell:])):
        _ok(rec)
        lrs = SWEEP["full"] if rec["method"] == "full" else SWEEP["default"]
        assert [t["lr"] for t in rec["lr_trials"]] == lrs
        assert all(t["status"] == "ok" for t in rec["lr_trials"])
        best = max(rec["lr_trials"], key=lambda t: t["holdout_miou"])  # the first of equals
        assert rec["lr_chosen"] == best["lr"] == rec["lr_used"]
        assert rec["holdout_fraction"] == 0.25
        # per trial: train on the training part, evaluate on the held-out part (never on val)
        trials, final = mine[:2 * len(lrs)], mine[2 * len(lrs):]
        for i, lr in enumerate(lrs):
            (k1, xt, lr_t), (k2, xe, m) = trials[2 * i], trials[2 * i + 1]
            assert (k1, k2, lr_t) == ("train", "eval", lr)
            assert torch.equal(xt, x[tr]) and torch.equal(xe, x[ho])
            assert m == rec["lr_trials"][i]["holdout_miou"]
        # the cell then trains on the whole training split at the chosen lr and evaluates on val
        assert final[0][0] == "train" and torch.equal(final[0][1], x) and final[0][2] == rec["lr_chosen"]
        assert final[1][0] == "eval" and torch.equal(final[1][1], xval)
        assert rec["miou"]["val"] == final[1][2]


def _indices(ds):
    """The sample indices a dataset config selects (on it, or through a subset wrapper); None: all."""
    while True:
        if ds.get("indices") is not None:
            return [int(i) for i in ds["indices"]]
        if "dataset" not in ds:
            return None
        ds = ds["dataset"]


def _inner(ds):
    while "dataset" in ds:
        ds = ds["dataset"]
    return ds


@pytest.mark.slow
def test_lr_sweep_mmengine_engine_holds_out_the_same_part(folder, tmp_path, monkeypatch):
    pytest.importorskip("mmseg")
    from mmengine.config import Config

    from promptmatch.benchmark.mmseg_cell import MmengineEngine

    seen = []
    real_eval = MmengineEngine._evaluate

    def evaluate(self, runner, dataset, classes):
        res = real_eval(self, runner, dataset, classes)
        seen.append((_inner(dataset)["data_prefix"]["img_path"], _indices(dataset), res[0]))
        return res

    monkeypatch.setattr(MmengineEngine, "_evaluate", evaluate)
    spec = bm.validate_spec(make_spec([{"name": "mine", "folder": str(folder)}], engine="mmengine",
                                      lr={"default": [1e-3, 1e-2]}, holdout=0.25, warmup=0))
    (cell,) = bm.expand_grid(spec)
    (rec,) = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    _ok(rec)
    tr, ho = holdout_split(6, 0.25, seed=0)  # the folder's 6 training images, as in the memory engine
    assert [t["lr"] for t in rec["lr_trials"]] == [1e-3, 1e-2]
    assert rec["lr_chosen"] == max(rec["lr_trials"], key=lambda t: t["holdout_miou"])["lr"] == rec["lr_used"]
    assert seen[:2] == [("img_dir/train", ho, t["holdout_miou"]) for t in rec["lr_trials"]]
    assert seen[2:] == [("img_dir/val", None, rec["miou"]["val"])]
    work = runner_mod.cell_dir(tmp_path / "out", cell)
    for i, lr in enumerate([1e-3, 1e-2]):
        cfg = Config.fromfile(str(work / f"lr_{i}" / "config.py"))
        assert _indices(cfg.train_dataloader.dataset) == tr
        assert _inner(cfg.train_dataloader.dataset)["data_prefix"]["img_path"] == "img_dir/train"
        assert cfg.optim_wrapper.optimizer.lr == lr
    final = Config.fromfile(rec["config_file"])
    assert _indices(final.train_dataloader.dataset) is None and final.optim_wrapper.optimizer.lr == rec["lr_chosen"]


def _memory_cell(folder, lr):
    spec = bm.validate_spec(make_spec([{"name": "mine", "folder": str(folder)}], engine="memory", lr=lr))
    (cell,) = bm.expand_grid(spec)
    return cell


def test_diverged_trials_are_scored_worst(folder, monkeypatch):
    def trial(self, lr):
        if lr == 1e-2:
            raise pm.DivergenceError("test: loss is nan", step=1, loss=float("nan"), lr=lr, skipped=[],
                                     reason="loss")
        if lr == 3e-2:
            return float("nan")  # a NaN score is no better
        return 0.0  # the lowest possible score: still above a diverged trial

    monkeypatch.setattr(cell_mod.MemoryEngine, "trial", trial)
    rec = bm.run_cell(_memory_cell(folder, {"default": [1e-2, 3e-2, 1e-3]}))
    _ok(rec)
    assert [t["status"] for t in rec["lr_trials"]] == ["diverged", "ok", "ok"]
    assert rec["lr_trials"][0]["holdout_miou"] is None and "loss is nan" in rec["lr_trials"][0]["reason"]
    assert rec["lr_chosen"] == 1e-3 == rec["lr_used"]


def test_lr_extend_goes_past_the_end_while_the_best_is_there():
    """``lr_extend``: one step of the list's ratio at an end while the best held-out mIoU is at
    that end, at most ``lr_extend`` steps each way; a diverged step ends it."""
    from promptmatch.benchmark.cell import _sweep_rule

    def rule(grid, extend, score):
        def result(lr):
            m = score(lr)
            return {"lr": lr, "holdout_miou": m, "status": "ok"} if m is not None else \
                {"lr": lr, "holdout_miou": None, "status": "diverged"}
        best, trials = _sweep_rule(grid, extend, result)
        return best, [t["lr"] for t in trials]

    grid = [1e-3, 4e-3, 1.6e-2]

    def peak(at):
        return lambda lr: -abs(math.log(lr / at))

    assert rule(grid, 0, peak(1e-4)) == (1e-3, grid)  # no extension: the end of the list
    assert rule(grid, 2, peak(4e-3)) == (4e-3, grid)  # inside the list: nothing more
    assert rule(grid, 2, peak(2.5e-4)) == (2.5e-4, grid + [2.5e-4, 6.25e-5])  # past it, then worse: stop
    assert rule(grid, 1, peak(1e-5)) == (2.5e-4, grid + [2.5e-4])  # at most lr_extend steps
    assert rule(grid, 2, peak(1e-5)) == (6.25e-5, grid + [2.5e-4, 6.25e-5])
    assert rule(grid, 2, peak(1.0)) == (2.56e-1, grid + [6.4e-2, 2.56e-1])  # upwards, by the top's ratio
    assert rule(grid, 2, lambda lr: None if lr > 2e-2 else lr) == (1.6e-2, grid + [6.4e-2])  # diverged: worst


def test_raising_lr_extend_reruns_only_sweeps_with_the_best_at_an_end(folder, tmp_path, monkeypatch):
    """Cells finished with ``lr_extend: 0`` and the spec raised to 1: a cell whose best lr was
    at an end runs again with its trials reused, trying only the new lrs; where the choice
    stays, its final results are kept (``final_reused``), else it trains again; the cell key
    is the same; a third run has nothing to do."""
    peaks = {"linear": 2.5e-4, "full": 8e-4}  # linear improves past the end, full does not
    trials, finals = [], []
    real_final = cell_mod.MemoryEngine.final

    def trial(self, lr):
        trials.append((self.cell.method, lr))
        return 1.0 - abs(math.log(lr / peaks[self.cell.method])) / 10

    def final(self, lr):
        finals.append((self.cell.method, lr))
        return real_final(self, lr)

    monkeypatch.setattr(cell_mod.MemoryEngine, "trial", trial)
    monkeypatch.setattr(cell_mod.MemoryEngine, "final", final)
    entry, grid = {"name": "mine", "folder": str(folder)}, [1e-3, 4e-3, 1.6e-2]

    def run(extend):
        spec = bm.validate_spec(make_spec([entry], methods=["linear", "full"], engine="memory",
                                          lr={"default": grid}, lr_extend=extend))
        trials.clear(), finals.clear()
        bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
        return {r["method"]: r for r in bm.ResultStore(tmp_path / "out" / "results.jsonl").latest()}

    before = run(0)
    assert {m: r["lr_chosen"] for m, r in before.items()} == {"linear": 1e-3, "full": 1e-3}
    after = run(1)
    assert sorted(trials) == [("full", 2.5e-4), ("linear", 2.5e-4)] and finals == [("linear", 2.5e-4)]
    assert {m: r["key"] for m, r in after.items()} == {m: r["key"] for m, r in before.items()}
    for m, r in after.items():
        _ok(r)
        assert [t["lr"] for t in r["lr_trials"]] == grid + [2.5e-4]
        assert r["lr_trials"][:3] == before[m]["lr_trials"]
    assert after["linear"]["lr_chosen"] == after["linear"]["lr_used"] == 2.5e-4 and "final_reused" not in after["linear"]
    assert after["full"]["lr_chosen"] == 1e-3 and after["full"]["final_reused"] == before["full"]["finished_at"]
    assert after["full"]["miou"] == before["full"]["miou"] and after["full"]["lr_used"] == 1e-3
    run(1)
    assert trials == [] and finals == []


def test_lr_extend_needs_a_sweep(folder):
    entry = {"name": "mine", "folder": str(folder)}
    with pytest.raises(bm.SpecError, match="'lr_extend' extends an lr sweep"):
        bm.validate_spec(make_spec([entry], lr=1e-3, lr_extend=1))
    with pytest.raises(bm.SpecError, match="'lr_extend' must be an integer >= 0"):
        bm.validate_spec(make_spec([entry], lr={"default": [1e-3, 1e-2]}, lr_extend=-1))


def test_every_trial_diverged_gives_a_diverged_cell(folder, tmp_path, monkeypatch):
    def trial(self, lr):
        raise pm.DivergenceError(f"test: nan at lr {lr}", step=0, loss=float("nan"), lr=lr, skipped=[],
                                 reason="loss")

    def final(self, lr):
        raise AssertionError("the final run must not start when every trial diverged")

    monkeypatch.setattr(cell_mod.MemoryEngine, "trial", trial)
    monkeypatch.setattr(cell_mod.MemoryEngine, "final", final)
    spec = bm.validate_spec(make_spec([{"name": "mine", "folder": str(folder)}], engine="memory",
                                      lr={"default": [1e-3, 1e-2]}))
    (rec,) = bm.run_benchmark(spec, tmp_path / "out", progress=False, isolate=False)
    assert rec["status"] == "diverged" and rec["diverged_what"] == "sweep"
    assert "every lr of the sweep diverged" in rec["reason"] and "nan at lr 0.01" in rec["reason"]
    assert "miou" not in rec and "lr_chosen" not in rec
    assert [t["status"] for t in rec["lr_trials"]] == ["diverged", "diverged"]
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.parametrize("lr, message", [
    ({"default": [1e-3, 1e-2], "full": [1e-4]}, "same number of trials"),
    ({"default": [1e-3], "nosuchmethod": [1e-4]}, "are not methods of the spec"),
    ({"linear": [1e-3]}, "no list for ['full']"),
    ({"default": []}, "non-empty list of positive numbers"),
    ({"default": [1e-3, -1.0]}, "non-empty list of positive numbers"),
    ({"default": 1e-3}, "non-empty list of positive numbers"),
])
def test_lr_sweep_validation_errors(lr, message, folder):
    with pytest.raises(bm.SpecError) as info:
        bm.validate_spec(make_spec([{"name": "mine", "folder": str(folder)}], methods=["linear", "full"], lr=lr))
    assert message in str(info.value)


def test_lr_sweep_uses_variant_label_then_registered_name():
    from promptmatch.benchmark.spec import method_lrs

    sweep = {"default": [1.0, 2.0], "spm": [3.0, 4.0], "spm-small": [5.0, 6.0]}
    assert method_lrs({"lr": sweep}, "spm-small", "spm") == [5.0, 6.0]
    assert method_lrs({"lr": sweep}, "spm-other", "spm") == [3.0, 4.0]
    assert method_lrs({"lr": sweep}, "linear") == [1.0, 2.0]
    assert method_lrs({"lr": 0.5}, "linear") == [0.5]


# ----------------------------------------------------------------------------- 7. CPU bf16
@pytest.mark.slow
def test_bf16_on_cpu_both_engines(folder, tmp_path):
    pytest.importorskip("mmseg")
    from mmengine.config import Config

    spec = bm.validate_spec(make_spec([{"name": "mine", "folder": str(folder)}], engine=["memory", "mmengine"],
                                      amp="bf16"))
    recs = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    assert [r["engine"] for r in recs] == ["memory", "mmengine"]
    for rec in recs:
        _check_ok_record(rec, CLASSES)
        assert rec["settings"]["amp"] == "bf16" and "bf16" in rec["setting_label"]
        assert math.isfinite(rec["loss_last"])
    cfg = Config.fromfile(recs[1]["config_file"])
    assert cfg.optim_wrapper.type == "promptmatch.AutocastOptimWrapper" and cfg.optim_wrapper.dtype == "bfloat16"


@pytest.mark.slow
def test_torchrun_trains_mmengine_cells_data_parallel(folder, tmp_path):
    """Under torchrun (2 CPU processes, gloo) mmengine and runner cells (the folder's default
    engine) train with mmengine's DDP over both processes; memory cells run on rank 0 alone;
    rank 0 writes one record per cell. The processes see no GPU, so this is the CPU path on a
    GPU machine too (the NCCL run is tests/test_cuda.py's)."""
    pytest.importorskip("mmseg")
    spec = {"name": "dist", "methods": ["linear", "spm"], "backbones": ["test_resnet"],
            "datasets": [{"name": "mine", "folder": str(folder)}],
            "settings": [{"image_size": 64, "steps": 2, "batch": 2, "warmup": 0, "latency_images": 1, "workers": 0,
                          "eval_mode": "slide", "eval_crop": 48, "eval_stride": 32, "engine": "mmengine"},
                         {"image_size": 64, "steps": 2, "batch": 2, "warmup": 0, "latency_images": 1, "workers": 0,
                          "eval_mode": "slide", "eval_crop": 48, "eval_stride": 32},
                         {"image_size": 64, "steps": 2, "batch": 2, "warmup": 0, "latency_images": 1,
                          "engine": "memory"}],
            "seeds": [0]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # gloo, also where GPUs exist
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29547", "-m", "promptmatch.benchmark", "--spec", str(path),
                           "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(out)
    assert sorted((r["method"], r["engine"]) for r in recs) == [
        ("linear", "memory"), ("linear", "mmengine"), ("linear", "runner"),
        ("spm", "memory"), ("spm", "mmengine"), ("spm", "runner")]
    for rec in recs:
        _ok(rec)
        assert rec["world_size"] == (1 if rec["engine"] == "memory" else 2)
        assert rec["device"].startswith("cpu") and rec["peak_mem_kind"].startswith("cpu"), rec["device"]
    logs = "".join(p.read_text() for p in (out / "cells").glob("*/*/*.log"))
    assert "promptmatch.CPUDistributedDataParallel" in logs and "Distributed training: True" in logs
    assert (out / "report.md").is_file()


def test_cell_keys_name_where_a_dataset_comes_from(folder, tmp_path):
    """Another folder (or config) under the same name is another cell; settings that resolve to
    the same cell give it once; an eval-only folder needs no train split."""
    other = write_folder(tmp_path / "other", seed=3)
    base = {"name": "k", "methods": ["linear"], "backbones": ["test_resnet"], "seeds": [0],
            "settings": [{"image_size": 64, "steps": 2}, {"image_size": 64, "steps": 2, "lr": 1e-4}]}
    a = bm.expand_grid(bm.validate_spec({**base, "datasets": [{"name": "mine", "folder": str(folder)}]}))
    b = bm.expand_grid(bm.validate_spec({**base, "datasets": [{"name": "mine", "folder": str(other)}]}))
    assert len(a) == 1 and len(b) == 1  # lr null resolves to the mmengine default 1e-4: one cell
    assert a[0].key != b[0].key
    offline = bm.expand_grid(bm.validate_spec({**base, "datasets": ["nuclei"], "settings": {"steps": 2}}))
    assert json.loads(offline[0].key)["dataset"] == "nuclei"  # offline keys as before
    shutil.rmtree(other / "img_dir" / "train")
    shutil.rmtree(other / "ann_dir" / "train")
    spec = bm.validate_spec({**base, "datasets": [{"name": "mine", "folder": str(folder), "eval_on": ["t"]},
                                                  {"name": "t", "folder": str(other), "eval_only": True}]})
    assert check_spec_data(spec) == []


def test_mmseg_wrapped_dataset_configs_hold_out_inner_samples(tmp_path):
    """A config whose training set is a ConcatDataset inside a RepeatDataset (VOC aug, DRIVE):
    the held-out part gets the val pipeline on the inner datasets, counting sees the samples
    (not their repeats), and image_size rescales every inner pipeline."""
    pytest.importorskip("mmseg")
    from promptmatch.benchmark.data import mmseg_dataset_config, train_count

    root = write_ade(tmp_path / "ade")
    cfg = tmp_path / "wrapped.py"
    cfg.write_text(f"""
_base_ = ['mmseg::_base_/datasets/ade20k.py']
_inner = dict(type='ADE20KDataset', data_root={str(root)!r}, data_prefix=dict(img_path='images/training',
              seg_map_path='annotations/training'), pipeline={{{{_base_.train_pipeline}}}})
train_dataloader = dict(dataset=dict(_delete_=True, type='RepeatDataset', times=1000,
                        dataset=dict(type='ConcatDataset', datasets=[_inner, _inner])))
""")
    entry = {"name": "w", "source": "mmseg_config", "mmseg_config": str(cfg)}
    n = train_count(entry)
    assert n == 2 * len(list((root / "images" / "training").iterdir()))  # two copies, not 1000 repeats
    held, _ = mmseg_dataset_config(entry, "train", False, (64, 64), indices=[0, 1])
    assert held["type"] == "promptmatch.SubsetDataset" and held["dataset"]["type"] == "ConcatDataset"
    for inner in held["dataset"]["datasets"]:
        assert not any(t["type"] == "RandomCrop" for t in inner["pipeline"])  # the val pipeline
    trained, crop = mmseg_dataset_config(entry, "train", True, (64, 64), explicit_size=True)
    assert crop == (64, 64)
    assert trained["type"] == "RepeatDataset"  # training keeps the repeats
    for inner in trained["dataset"]["datasets"]:
        crops = [t["crop_size"] for t in inner["pipeline"] if t["type"] == "RandomCrop"]
        assert crops == [(64, 64)]
