"""A user's own folder with the main install only (``bash tools/setup_env.sh``, no mmcv, no
mmseg): a folder benchmark of ``spm``, ``lora`` and ``linear`` (lr sweep, two seeds) runs to a
complete report with plots, and ``python -m promptmatch.train`` then ``python -m
promptmatch.test`` reproduce the training run's val mIoU.

Runs in the venv that ``tools/run_tests.sh`` makes with the main set-up command alone and names
in ``PROMPTMATCH_MAIN_VENV``; the first test fails if mmcv or mmseg is importable there.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_engine import make_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def main_python() -> Path:
    venv = os.environ.get("PROMPTMATCH_MAIN_VENV")
    if not venv:
        if os.environ.get("CI"):
            pytest.fail("PROMPTMATCH_MAIN_VENV is not set: CI runs the tests through tools/run_tests.sh, "
                        "which makes the main-install venv and sets it")
        pytest.skip("PROMPTMATCH_MAIN_VENV is not set: tools/run_tests.sh makes a venv with the main "
                    "install only (bash tools/setup_env.sh) and sets it")
    py = Path(venv) / "bin" / "python"
    assert py.exists(), f"PROMPTMATCH_MAIN_VENV={venv} has no bin/python"
    return py


def _run(py: Path, *args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([str(py), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def test_main_install_lacks_the_mmseg_stack_and_has_the_main_job(main_python, tmp_path):
    code = ("import importlib.util as u, json; "
            "print(json.dumps({m: u.find_spec(m) is not None for m in "
            "('mmcv', 'mmseg', 'mmengine', 'peft', 'matplotlib', 'promptmatch')}))")
    found = json.loads(_run(main_python, "-c", code, cwd=tmp_path).stdout)
    assert not found["mmcv"] and not found["mmseg"], f"the main install must not carry the mmseg stack: {found}"
    assert found["mmengine"] and found["peft"] and found["matplotlib"] and found["promptmatch"], found
    where = _run(main_python, "-c", "import promptmatch, os; print(os.path.dirname(promptmatch.__file__))",
                 cwd=tmp_path).stdout.strip()
    assert Path(where).resolve() == (REPO / "promptmatch").resolve(), f"the main venv runs another checkout: {where}"


def test_folder_benchmark_runs_to_a_report_with_plots(main_python, tmp_path):
    folder = make_folder(tmp_path / "data", counts={"train": 10, "val": 4})
    spec = {
        "name": "own_folder",
        "methods": ["spm", "lora", "linear"],
        "backbones": [{"name": "test_resnet"}],
        "datasets": [{"name": "own", "folder": str(folder)}],
        "settings": {"image_size": 32, "steps": 3, "batch": 2, "warmup": 0, "workers": 0, "latency_images": 1,
                     "lr": {"default": [1e-3, 3e-3]}},
        "seeds": [0, 1],
        "device": "cpu",
        "threads": 1,
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = tmp_path / "bench"
    _run(main_python, "-m", "promptmatch.benchmark", "--spec", str(spec_file), "--validate", cwd=tmp_path)
    _run(main_python, "-m", "promptmatch.benchmark", "--spec", str(spec_file), "--out", str(out), "--no-progress",
         cwd=tmp_path, timeout=1500)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    finals = {}
    for rec in records:  # the latest record of a cell counts
        finals[rec["key"]] = rec
    assert len(finals) == 6, sorted(finals)  # 3 methods x 2 seeds
    assert {r["method"] for r in finals.values()} == {"spm", "lora", "linear"}
    bad = {k: (r.get("status"), r.get("reason")) for k, r in finals.items() if r.get("status") != "ok"}
    assert not bad, bad
    assert all(r.get("engine") == "runner" for r in finals.values()), {r.get("engine") for r in finals.values()}
    assert all(len(r.get("lr_trials") or []) == 2 for r in finals.values()), \
        "each method's two learning rates were tried on the held-out part"
    report = (out / "report.md").read_text()
    assert "failed" not in report.lower() or "0 failed" in report.lower(), report[:2000]
    plots = sorted(p.name for p in out.rglob("*.png"))
    assert plots, f"no plots next to report.md: {sorted(p.name for p in out.iterdir())}"
    for name in plots:
        assert name in report, f"report.md does not show {name}"


def test_train_then_test_reproduce_the_val_miou(main_python, tmp_path):
    folder = make_folder(tmp_path / "data", counts={"train": 6, "val": 3})
    run = tmp_path / "run"
    _run(main_python, "-m", "promptmatch.train", "--folder", str(folder), "--backbone", "test_resnet",
         "--method", "spm", "--steps", "4", "--batch", "2", "--crop", "32", "--workers", "0", "--no-progress",
         "--out", str(run), cwd=tmp_path)
    trained = json.loads((run / "metrics.json").read_text())
    for name in ("prompts.safetensors", "segmentor.safetensors"):
        assert (run / name).is_file(), name
    result = tmp_path / "test.json"
    _run(main_python, "-m", "promptmatch.test", "--folder", str(folder), "--prompts", str(run / "prompts.safetensors"),
         "--no-progress", "--out", str(result), cwd=tmp_path)
    tested = json.loads(result.read_text())
    assert tested["metrics"]["mIoU"] == pytest.approx(trained["val_miou"], abs=1e-9)
