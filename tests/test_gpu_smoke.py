"""tools/gpu_smoke.py in its shortened CPU form (``--device cpu --quick``): the table, the JSON,
isolated steps, skips with reasons, and the exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptmatch.tools import gpu_smoke

REPO = Path(__file__).resolve().parents[1]


def _check_results(data, ran_ok=()):
    """Every step ok, or skipped with a reason; the steps in ``ran_ok`` ok."""
    assert data["results"], data
    for r in data["results"]:
        assert r["status"] in ("ok", "skip"), f"{r['name']}: {r['status']}: {r['note']}\n{r['error']}"
        assert r["seconds"] >= 0 and isinstance(r["note"], str)
        if r["status"] == "skip":
            assert len(r["note"]) > 10, f"{r['name']} skipped without a reason"
    status = {r["name"]: r["status"] for r in data["results"]}
    for name in ran_ok:
        assert status.get(name) == "ok", (name, status)
    assert data["failed"] == [] and data["counts"]["fail"] == 0
    assert data["counts"]["ok"] + data["counts"]["skip"] == len(data["results"])


def test_steps_of_one_backbone_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    rc = gpu_smoke.main(["--device", "cpu", "--quick", "--only", "train/resnet/spm,train/resnet/linear,eval/resnet",
                         "--only", "train/resnet/vpt", "--only", "predict/resnet", "--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert rc == 0, printed
    _check_results(data, ["train/resnet/spm/bf16", "train/resnet/linear/bf16", "eval/resnet/whole",
                          "eval/resnet/slide", "predict/resnet"])
    names = [r["name"] for r in data["results"]]
    assert names == ["train/resnet/linear/bf16", "train/resnet/spm/bf16", "train/resnet/vpt/bf16",
                     "train/resnet/spm/fp16", "eval/resnet/whole", "eval/resnet/slide", "predict/resnet"]
    by_name = {r["name"]: r for r in data["results"]}
    # what cannot run here is skipped with the reason, never failed
    assert "needs CUDA" in by_name["train/resnet/spm/fp16"]["note"]
    assert "does not apply" in by_name["train/resnet/vpt/bf16"]["note"]
    assert by_name["train/resnet/spm/bf16"]["metrics"]["step_ms_median"] > 0
    assert 0 <= by_name["eval/resnet/slide"]["metrics"]["miou"] <= 1
    assert data["environment"]["device"] == "cpu" and data["quick"] and data["size"] == 64
    # the table: a header and one row per step with its status and seconds
    rows = [line for line in printed.splitlines() if " | " in line]
    assert rows[0].split(" | ")[:3] == ["step".ljust(len(rows[0].split(" | ")[0])), "status", "seconds"]
    assert len(rows) == 1 + len(names)
    assert any(r.startswith("train/resnet/spm/fp16") and "| skip" in r for r in rows)


def test_a_failing_step_is_recorded_the_run_goes_on_and_the_exit_status_says_so(tmp_path, capsys):
    """A ViT weights file that does not exist: its steps fail with the reason, the ResNet's run."""
    out = tmp_path / "smoke.json"
    missing = tmp_path / "no_such_vit.pth"
    rc = gpu_smoke.main(["--device", "cpu", "--quick", "--only", "train/vit/spm/bf16,eval/vit/whole,"
                         "train/resnet/spm/bf16", "--weights", str(missing), "--out", str(out)])
    capsys.readouterr()
    assert rc == 1
    data = json.loads(out.read_text())
    by_name = {r["name"]: r for r in data["results"]}
    assert list(by_name) == ["train/vit/spm/bf16", "eval/vit/whole", "train/resnet/spm/bf16"]
    for name in ("train/vit/spm/bf16", "eval/vit/whole"):
        assert by_name[name]["status"] == "fail"
        assert "no_such_vit.pth" in by_name[name]["note"] + by_name[name]["error"]
        assert "Traceback" in by_name[name]["error"]
    assert by_name["train/resnet/spm/bf16"]["status"] == "ok"  # the run went on
    assert data["failed"] == ["train/vit/spm/bf16", "eval/vit/whole"] and data["counts"]["fail"] == 2


def test_bad_usage_is_an_error_before_any_step(tmp_path, capsys):
    assert gpu_smoke.main(["--device", "cpu", "--quick", "--only", "nothing-matches", "--out",
                           str(tmp_path / "a.json")]) == 2
    assert "no step matches" in capsys.readouterr().err
    assert gpu_smoke.main(["--device", "cpu", "--size", "100", "--out", str(tmp_path / "b.json")]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_smoke.main(["--out", str(tmp_path / "c.json")]) == 2  # default device: cuda
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.json").exists()


@pytest.mark.slow
def test_the_shortened_form_through_the_tool_on_the_cpu(tmp_path):
    """``tools/gpu_smoke.py --device cpu --quick`` as CI runs it: every step ok or skipped with a
    reason, in well under two minutes."""
    out = tmp_path / "smoke.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    listed = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_smoke.py"), "--device", "cpu", "--quick",
                             "--list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-3000:]
    plan = listed.stdout.split()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_smoke.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == plan
    _check_results(data, ["train/vit/spm/bf16", "train/vit/vpt/bf16", "train/resnet/full/bf16", "eval/vit/slide",
                          "predict/vit", "bank/vit", "save_load/vit", "bench/memory", "torchrun/bench"])
    assert "steps in" in proc.stdout and "| ok" in proc.stdout
    for name in plan:  # every row of the table is printed
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name


def test_gpu_check_script_runs_its_parts_into_one_folder(tmp_path):
    """tools/gpu_check.sh with the smoke part only, in its CPU form: summary.md with the part's
    status and table, the JSON and the log in --out, copies in --collect; a bad part is an error."""
    out, collect = tmp_path / "check", tmp_path / "collect"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    script = str(REPO / "tools" / "gpu_check.sh")
    bad = subprocess.run(["bash", script, "--only", "smoke,nonsense", "--python", sys.executable, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'nonsense'" in bad.stderr
    proc = subprocess.run(["bash", script, "--only", "smoke", "--python", sys.executable, "--out", str(out),
                           "--collect", str(collect), "--smoke-args",
                           "--device cpu --quick --only train/resnet/linear"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = (out / "summary.md").read_text()
    assert "torch" in summary and "## smoke (tools/gpu_smoke.py): ok in" in summary
    assert "train/resnet/linear/bf16 | ok" in summary
    data = json.loads((out / "gpu_smoke.json").read_text())
    assert [r["name"] for r in data["results"]] == ["train/resnet/linear/bf16"]
    assert sorted(p.name for p in collect.iterdir()) == ["gpu_smoke.json", "gpu_smoke.log", "summary.md"]
    assert f"results in {out}" in proc.stdout
