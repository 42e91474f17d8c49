"""``python -m promptmatch.train`` and ``python -m promptmatch.test`` on a tiny generated folder:
the test command reproduces the training run's val mIoU, bad input is refused with the fix,
training needs neither mmcv nor mmseg, and ``torchrun`` trains data-parallel on CPUs (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_engine import make_folder

from promptmatch import test as test_cli
from promptmatch import train as train_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_resnet", "--method", "spm", "--steps", "2", "--batch", "2", "--crop", "32", "--lr", "1e-3",
        "--workers", "0", "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


def _env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_train_then_test_reproduce_the_val_miou(folder, tmp_path, capsys):
    out = tmp_path / "run"
    # 64 px crops and 20 steps at lr 5e-3: enough for predictions that differ between classes
    argv = ["--folder", str(folder), "--out", str(out), *TINY, "--crop", "64", "--steps", "20", "--lr", "5e-3"]
    assert train_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "val mIoU (val):" in printed and "prompts:" in printed
    trained = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= trained["val_miou"] <= 1.0
    assert sum(v > 0 for k, v in trained["metrics"].items() if k.startswith("IoU.")) >= 2  # not one class everywhere
    sources = (["--prompts", str(out / "prompts.safetensors")], ["--segmentor", str(out / "segmentor.safetensors")])
    for source in sources:
        res = tmp_path / f"test{source[0]}.json"
        assert test_cli.main(["--folder", str(folder), *source, "--out", str(res), "--no-progress"]) == 0
        tested = json.loads(res.read_text())
        assert tested["val_miou"] == pytest.approx(trained["val_miou"], abs=1e-9)
        assert tested["metrics"] == pytest.approx(trained["metrics"], abs=1e-9, nan_ok=True)
        assert f"{100 * trained['val_miou']:.2f} %" in capsys.readouterr().out


def test_held_out_part_of_train_is_validated_and_tested_again(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--folder", str(folder), "--out", str(out), "--holdout", "0.34", *TINY]) == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["split"] == "train" and len(rec["val_indices"]) == 2  # round(0.34 * 6) held out
    res = tmp_path / "test.json"
    assert test_cli.main(["--folder", str(folder), "--prompts", str(out / "prompts.safetensors"), "--out", str(res),
                          "--no-progress"]) == 0
    tested = json.loads(res.read_text())
    assert tested["held_out"] and tested["val_miou"] == pytest.approx(rec["val_miou"], abs=1e-9)


@pytest.mark.parametrize("change, expect", [
    ({"--folder": "{tmp}/nowhere"}, "no such folder"),
    ({"--weights": "{tmp}/missing.safetensors"}, "--weights"),
    ({"--backbone": "no_such_backbone_xyz"}, "is not a timm model name"),
    ({"--method": "nope"}, "choose one of"),
    ({"--val-split": "test"}, "--holdout"),
])
def test_bad_input_is_refused_naming_the_fix(folder, tmp_path, capsys, change, expect):
    args = {"--folder": str(folder), "--out": str(tmp_path / "run"), "--backbone": "test_resnet", "--method": "spm"}
    args.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    argv = [x for kv in args.items() for x in kv] + ["--steps", "2", "--crop", "32", "--no-progress"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing was trained" in err and expect in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_test_cli_names_a_missing_prompts_file(folder, tmp_path, capsys):
    assert test_cli.main(["--folder", str(folder), "--prompts", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


BLOCKED = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mmcv", "mmseg"):
            raise ImportError(f"{name} is blocked: the folder engine must work without it")
        return None

sys.meta_path.insert(0, Block())
from promptmatch.train import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mmcv", "mmseg"))
print("MMSTACK_MODULES", loaded)
sys.exit(rc if not loaded else 3)
"""


def test_train_cli_runs_with_mmcv_and_mmseg_blocked(folder, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", BLOCKED, "--folder", str(folder), "--out", str(out), *TINY],
                         cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "MMSTACK_MODULES []" in res.stdout
    assert (out / "prompts.safetensors").is_file() and (out / "segmentor.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_trains_data_parallel_on_cpus(folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "promptmatch.train", "--folder", str(folder), "--out", str(out), *TINY]
    res = subprocess.run(cmd, cwd=str(REPO), env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, "\n".join([res.stdout[-2000:], res.stderr[:4000], "...", res.stderr[-3000:]])
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["world_size"] == 2 and 0.0 <= rec["val_miou"] <= 1.0
    assert res.stdout.count("val mIoU") == 1  # the main process reports; the other trains along
