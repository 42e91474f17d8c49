"""What a benchmark run will meet, seen before it trains: ``--validate`` resolves every
cell's settings against the data, this machine and the installed packages (and a run refuses
on the same problems); a refused run leaves ``--out`` as it was; console reasons are never
cut mid-word; the report's counts follow ``--retry-errors``; the report is written without
matplotlib.

Everything runs on ``test_resnet`` (random init), 32 px folder images and 2 steps, in this
process. A missing optional package is simulated by ``sys.modules[name] = None`` (what
``import name`` then raises is the ModuleNotFoundError of a missing package).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch.benchmark import runner as runner_mod
from promptmatch.benchmark.data import DataProblemsError
from promptmatch.benchmark.report import reason_summary, shorten, tail_lines
from promptmatch.benchmark.validation import check_run

CLASSES = ["background", "thing"]
SMALL = {"steps": 2, "batch": 2, "warmup": 1, "eval_batch": 4, "latency_images": 1, "workers": 0}


def write_folder(root: Path, n_train: int = 4, n_val: int = 2, sizes=((32, 32),), suffix: str = ".png") -> Path:
    """A folder dataset in mmseg's layout; the images cycle through ``sizes`` (width, height)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            mask = rng.integers(0, len(CLASSES), (h, w)).astype(np.uint8)
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "img_dir" / split / f"{i:04d}{suffix}")
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i:04d}.png")
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def make_spec(folder: Path, methods=("linear",), device: str = "cpu", **settings) -> dict:
    return {"name": "val", "methods": list(methods), "backbones": [{"name": "test_resnet"}],
            "datasets": [{"name": "mine", "folder": str(folder)}], "device": device,
            "settings": {**SMALL, "engine": "memory", "image_size": 32, **settings}, "seeds": [0]}


def cli(tmp_path: Path, spec: dict, *args: str) -> int:
    path = tmp_path / "spec_file.json"
    path.write_text(json.dumps(spec))
    return bm.main(["--spec", str(path), "--no-progress", *args])


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any cell starts."""
    def refuse(*a, **k):
        raise AssertionError("a cell was run although the run should have been refused")

    for name in ("run_cell", "run_cell_in_child"):
        monkeypatch.setattr(runner_mod, name, refuse)


@pytest.fixture
def in_process(monkeypatch):
    """The command line's cells run in this process (a failing one gives a child's error record)."""
    def run(cell, timeout_s=None, work_dir=None, prior=None):
        try:
            return bm.run_cell(cell, work_dir=work_dir, prior=prior)
        except Exception:
            return bm.error_record(cell, traceback.format_exc()[-4000:], 0.0)

    monkeypatch.setattr(runner_mod, "run_cell_in_child", run)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time (None: no folder)."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. settings vs data
def test_image_size_null_on_images_of_several_sizes_fails_validation(tmp_path, capsys, no_training):
    folder = write_folder(tmp_path / "mixed", sizes=((32, 32), (40, 24)))
    spec = make_spec(folder, image_size=None)
    assert cli(tmp_path, spec, "--validate") == 2
    err = capsys.readouterr().err
    assert "2 problem(s) with the settings" in err, err  # the training split's and the val split's
    assert "image_size is null" in err and "img_dir/train holds images of 2 different sizes" in err, err
    assert "img_dir/val holds images of 2 different sizes" in err, err
    assert "32x32 (2 images, e.g. 0000.png), 40x24 (2 images, e.g. 0001.png)" in err, err
    assert 'set "image_size": <side> in the spec\'s settings' in err, err  # the spec's name and the fix
    assert "size=" not in err  # not the Python API's argument
    # a run refuses on the same problem, before any training and before writing anything
    with pytest.raises(DataProblemsError, match="image_size is null") as info:
        bm.run_benchmark(bm.validate_spec(spec), tmp_path / "out", progress=False, isolate=False)
    assert len(info.value.problems) == 2
    assert not (tmp_path / "out").exists()
    # with an image_size, or on the mmengine engine (which crops), the sizes are fine
    assert cli(tmp_path, make_spec(folder, image_size=32), "--validate") == 0
    assert not check_run(bm.validate_spec(make_spec(folder, image_size=None, engine="mmengine"))).data


def test_validation_lists_every_settings_problem_at_once(tmp_path, capsys, monkeypatch, no_training):
    """A missing optional dependency of a method (peft for lora), an amp the device cannot run,
    images of several sizes (in two splits): one message lists all four; a method that does not apply to the
    backbone is a note (its cells are recorded as skipped)."""
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    folder = write_folder(tmp_path / "mixed", sizes=((32, 32), (40, 24)))
    spec = make_spec(folder, methods=["linear", "lora", "vpt"], image_size=None, amp="fp16")
    assert cli(tmp_path, spec, "--validate") == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "4 problem(s) with the settings" in err, err
    assert "method 'lora' (on test_resnet): the 'lora' tuning method needs the optional dependency peft" in err, err
    assert "leave 'lora' out of the spec's methods" in err
    assert "setting 'amp': amp='fp16' needs a CUDA device" in err, err
    assert "different sizes" in err
    assert "note: method 'vpt' does not apply to backbone 'test_resnet'" in captured.out, captured.out
    assert "recorded as skipped" in captured.out
    # the Python API: the same problems, data and settings apart
    check = check_run(bm.validate_spec(spec))
    assert check.data == [] and len(check.settings) == 4 and len(check.notes) >= 1
    # a valid spec with a method that does not apply: a note only, exit status 0
    monkeypatch.delitem(sys.modules, "peft")
    assert cli(tmp_path, make_spec(folder, methods=["linear", "vpt"]), "--validate") == 0
    assert "note: method 'vpt' does not apply" in capsys.readouterr().out


def test_sliding_window_as_large_as_the_image_is_a_note(tmp_path, capsys):
    folder = write_folder(tmp_path / "f")
    spec = make_spec(folder, eval_mode="slide", eval_crop=48, eval_stride=32)
    assert cli(tmp_path, spec, "--validate") == 0
    assert "note: setting eval_crop 48 is not smaller than image_size 32" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu_fails_validation(tmp_path, capsys):
    folder = write_folder(tmp_path / "f")
    assert cli(tmp_path, make_spec(folder, device="cuda"), "--validate") == 2
    err = capsys.readouterr().err
    assert "'device' is 'cuda', but this machine has no usable CUDA GPU" in err and "'cpu'" in err, err


def test_mmengine_engine_without_the_mmseg_stack_fails_validation(tmp_path, capsys, monkeypatch):
    """The issue's first case: a folder on the mmengine engine (the folders' default) where the
    mmseg stack is not installed passed --validate, then every cell failed."""
    for name in ("mmengine", "mmseg"):  # neither mmengine nor the rest of the mmseg stack installed
        monkeypatch.setitem(sys.modules, name, None)
    folder = write_folder(tmp_path / "f")
    spec = make_spec(folder)
    del spec["settings"]["engine"]  # the default engine of a folder dataset
    assert cli(tmp_path, spec, "--validate") == 2
    err = capsys.readouterr().err
    assert re.search(r"1 cell\(s\) \(dataset 'mine'\) run on the (mmengine|runner) engine", err), err
    assert "No module named 'mmengine'" in err or "import of mmengine halted" in err, err
    assert ("needs the mmseg stack" in err and "bash tools/setup_env.sh --mmseg" in err) or (
        "needs mmengine" in err and "pip install mmengine" in err), err
    assert "or set \"engine\": \"memory\"" in err


def test_runner_engine_needs_mmengine_and_a_folder(tmp_path, monkeypatch):
    """promptmatch's own folder engine (``engine: runner``): mmengine alone, folder datasets only."""
    from promptmatch.benchmark.validation import check_cells

    monkeypatch.setitem(sys.modules, "mmengine", None)  # mmengine not installed
    spec = bm.validate_spec(make_spec(write_folder(tmp_path / "f")))
    folder_cell = bm.expand_grid(spec)[0]
    offline = bm.validate_spec({**make_spec(tmp_path), "datasets": ["nuclei"]}).datasets[0]
    cells = [bm.Cell.from_dict({**c.to_dict(), "settings": {**c.settings, "engine": "runner"}})
             for c in (folder_cell, bm.Cell.from_dict({**folder_cell.to_dict(), "dataset": offline}))]
    problems, _ = check_cells(spec, cells)
    assert any("2 cell(s) (dataset 'mine', 'nuclei') run on the runner engine" in p and "needs mmengine" in p
               and "pip install mmengine" in p for p in problems), problems
    assert any("the runner engine trains folder datasets only, and dataset 'nuclei' is not one" in p
               for p in problems), problems


def test_mmengine_dataset_config_that_does_not_resolve_fails_validation(tmp_path, capsys):
    """A folder whose training images mix .png and .jpg: mmseg reads one suffix, so the
    mmengine engine's dataset config refuses it; validation says so (the memory engine reads both)."""
    folder = write_folder(tmp_path / "f")
    img = folder / "img_dir" / "train" / "0001.png"
    Image.open(img).convert("RGB").save(img.with_suffix(".jpg"), quality=95)
    img.unlink()
    spec = make_spec(folder, engine="mmengine")
    assert cli(tmp_path, spec, "--validate") == 2
    err = capsys.readouterr().err
    assert "the images of split 'train' mix suffixes ['.jpg', '.png']" in err and "give 'img_suffix'" in err, err
    assert not check_run(bm.validate_spec(make_spec(folder, engine="memory"))).problems


def test_data_and_settings_problems_are_listed_together(tmp_path, capsys):
    folder = write_folder(tmp_path / "f", n_train=2, n_val=1, sizes=((32, 32), (40, 24)))
    spec = make_spec(folder, image_size=None, lr={"default": [1e-3, 1e-2]}, holdout=0.2)
    assert cli(tmp_path, spec, "--validate") == 2
    err = capsys.readouterr().err
    # too few training images for the held-out part of the lr sweep, and their sizes: one message
    assert "1 data problem(s) and 1 problem(s) with the settings" in err, err
    assert "leave 0 held out" in err and "img_dir/train holds images of 2 different sizes" in err, err


# ----------------------------------------------------------------------------- 2. console reasons
def test_console_reason_is_cut_at_a_word_boundary(tmp_path, caplog, monkeypatch):
    words = " ".join(f"word{i:03d}" for i in range(120))  # a message longer than any console limit
    real = pm.create_segmentor

    def failing(backbone, method="spm", *a, **k):
        if method == "bitfit":
            raise RuntimeError(f"bitfit broke: {words}")
        return real(backbone, method, *a, **k)

    monkeypatch.setattr(pm, "create_segmentor", failing)
    folder = write_folder(tmp_path / "f")
    spec = bm.validate_spec(make_spec(folder, methods=["bitfit"]))
    with caplog.at_level(logging.WARNING, logger="promptmatch.benchmark.runner"):
        (rec,) = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=True, isolate=False)
    assert rec["status"] == "error" and words in rec["reason"]  # the record keeps the whole reason
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cell failed")]
    assert line.startswith("cell failed: bitfit | test_resnet | mine | ")
    summary = line.split(" | seed 0: ", 1)[1]
    assert summary.startswith("RuntimeError: bitfit broke: word000 word001"), line  # the start is kept
    shown = summary.split(" (full reason in ")[0]
    assert shown.endswith("...") and len(shown) <= 400
    assert all(re.fullmatch(r"word\d{3}", w) for w in shown[:-3].split(": ")[-1].split()), shown  # whole words
    table = (tmp_path / "out" / "report.md").read_text()
    (row,) = [ln for ln in table.splitlines() if "| bitfit |" in ln and "error: " in ln]  # not the summary's
    cell = row.split("error: ", 1)[1].split(" |")[0]
    assert cell.startswith("RuntimeError: bitfit broke: word000") and cell.endswith("...")
    assert all(re.fullmatch(r"word\d{3}", w) for w in cell[:-3].split(": ")[-1].split()), cell


def test_reason_summary_of_a_cut_child_stderr():
    message = ("ImportError: promptmatch.mmseg needs the mmseg stack (...), which is not installed in this Python "
               "environment (ModuleNotFoundError: No module named 'mmengine'). From the promptmatch checkout, run "
               "the one command:\n\n    bash tools/setup_env.sh --mmseg\n\nIt builds mmcv ...")
    stderr = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    import y\n" + message
    for cut in (stderr, stderr[40:], "child exited with 1: " + stderr[60:]):
        s = reason_summary(cut)
        assert s.startswith("ImportError: promptmatch.mmseg needs the mmseg stack"), s
        assert "bash tools/setup_env.sh --mmseg" in s, s
    assert reason_summary(stderr, 60) == "ImportError: promptmatch.mmseg needs the mmseg stack..."
    kept = tail_lines(stderr, 60)  # whole lines only: the text before it ends a line
    assert stderr.endswith(kept) and 0 < len(kept) <= 60 and stderr[-len(kept) - 1] == "\n", kept
    assert tail_lines(stderr, 10_000) == stderr
    assert shorten("short enough", 40) == "short enough"
    assert reason_summary("plain reason\nsecond line") == "plain reason second line"


# ----------------------------------------------------------------------------- 3. refused runs
@pytest.mark.parametrize("case", ["bad_data", "bad_settings", "bad_spec", "lock_held"])
def test_a_refused_run_changes_nothing_in_out(case, tmp_path, capsys, no_training):
    folder = write_folder(tmp_path / "f", sizes=((32, 32), (40, 24)) if case == "bad_settings" else ((32, 32),))
    spec = make_spec(folder, image_size=None if case == "bad_settings" else 32)
    if case == "bad_data":
        (folder / "ann_dir" / "train" / "0001.png").unlink()
    if case == "bad_spec":  # the memory engine cannot load an mmseg_config dataset: no grid
        spec["datasets"].append({"name": "ade", "mmseg_config": str(tmp_path / "ade.py")})
        (tmp_path / "ade.py").write_text("train_dataloader = None\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.json").write_text("{\"name\": \"the spec of an earlier run\"}\n")
    (out / "results.jsonl").write_text(json.dumps({"key": "k", "status": "ok"}) + "\n")
    (out / "report.md").write_text("# an earlier report\n")
    before = snapshot(out)
    holder = bm.OutputLock(tmp_path / "held") if case == "lock_held" else None
    if holder is not None:
        out = tmp_path / "held"
        with holder:  # another run writes there
            before = snapshot(out)
            assert cli(tmp_path, spec, "--out", str(out)) == 2
            assert snapshot(out) == before
        assert "another benchmark run" in capsys.readouterr().err
        return
    assert cli(tmp_path, spec, "--out", str(out)) == 2
    assert snapshot(out) == before  # no spec.json rewritten, no .lock, no cells/
    with pytest.raises(bm.SpecError):  # the Python API too (DataProblemsError is a SpecError)
        bm.run_benchmark(bm.validate_spec(spec), out, progress=False, isolate=False)
    assert snapshot(out) == before
    # a folder that did not exist is not created either
    assert cli(tmp_path, spec, "--out", str(tmp_path / "new")) == 2
    assert not (tmp_path / "new").exists()
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 4. counts after a retry
def test_report_counts_follow_retry_errors(tmp_path, monkeypatch, in_process):
    folder = write_folder(tmp_path / "f")
    spec = make_spec(folder, methods=["linear", "bitfit"])
    real = pm.create_segmentor

    def failing(backbone, method="spm", *a, **k):
        if method == "bitfit":
            raise RuntimeError("bitfit is broken for now")
        return real(backbone, method, *a, **k)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(pm, "create_segmentor", failing)
        assert cli(tmp_path, spec, "--out", str(out)) == 1
    report = (out / "report.md").read_text()
    assert "2 cells recorded: 1 method/setting groups with results, 0 skipped, 1 failed" in report, report
    assert cli(tmp_path, spec, "--out", str(out), "--retry-errors") == 0
    recs = bm.ResultStore(out / "results.jsonl").load()
    assert [r["status"] for r in recs] == ["ok", "error", "ok"]  # the failed record stays in the file
    report = (out / "report.md").read_text()
    assert "2 cells recorded: 2 method/setting groups with results, 0 skipped, 0 failed" in report, report
    assert "bitfit is broken" not in report
    assert [r["status"] for r in bm.ResultStore(out / "results.jsonl").latest()] == ["ok", "ok"]
    assert cli(tmp_path, spec, "--out", str(out), "--retry-errors") == 0  # nothing left to retry
    assert len(bm.ResultStore(out / "results.jsonl").load()) == 3


# ----------------------------------------------------------------------------- 5. no matplotlib
def test_report_without_matplotlib(tmp_path, monkeypatch, caplog, capsys, in_process):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # matplotlib not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    folder = write_folder(tmp_path / "f")
    spec = make_spec(folder)
    assert cli(tmp_path, spec, "--validate") == 0
    assert "note: matplotlib is not installed: report.md will be written without plots" in capsys.readouterr().out
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="promptmatch.benchmark.report"):
        assert cli(tmp_path, spec, "--out", str(out)) == 0
    report = (out / "report.md").read_text()
    assert "## mine" in report and "| linear |" in report
    assert "No plots: matplotlib is not installed" in report and "pip install matplotlib" in report
    assert not list(out.glob("*.png"))
    assert any("No plots: matplotlib is not installed" in r.getMessage() for r in caplog.records)
