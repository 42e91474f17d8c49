"""tools/cost.py: inference, training-step, memory and parameter cost of methods side by side."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "cost.py"
LATE = {"prompt_boundaries": [-2, -1], "backprop_backbone": True}
CLASSES = 8


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_cost_tool_measures_every_method_against_the_references(tmp_path, backbone):
    import torch

    import promptmatch as pm

    out = tmp_path / "cost.json"
    proc = _run("--backbone", backbone, "--weights", "none", "--size", "64", "--batch", "2", "--classes", str(CLASSES),
                "--rounds", "2", "--warmup", "1", "--mem-steps", "1", "--threads", "1", "--decoder", "linear",
                "--variant", "spm", "--variant", "late=spm:" + json.dumps(LATE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("command", "torch", "timm", "threads", "date", "device"):
        assert res[key], key
    assert res["threads"] == 1 and res["device"] == "cpu" and res["batch"] == 2 and res["size"] == 64
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"linear", "full", "lora", "spm", "late"}, (set(rows), res["skipped"])
    assert all(r["decoder"] == "linear" for r in rows.values())
    assert rows["late"]["method"] == "spm" and rows["late"]["method_cfg"] == LATE

    for label, r in rows.items():
        for f in ("inference_ms_median", "step_ms_median", "train_state_mb"):
            assert math.isfinite(r[f]) and r[f] > 0, (label, f, r[f])
        assert math.isfinite(r["peak_mb"]), label
    # every ratio is the stated quotient of the figures written beside it
    quotients = {"inference_ratio_to_frozen": ("inference_ms_median", "linear"),
                 "step_ratio_to_full": ("step_ms_median", "full"), "step_ratio_to_lora": ("step_ms_median", "lora"),
                 "peak_ratio_to_full": ("peak_mb", "full"), "peak_ratio_to_lora": ("peak_mb", "lora"),
                 "train_state_ratio_to_full": ("train_state_mb", "full"),
                 "train_state_ratio_to_lora": ("train_state_mb", "lora")}
    for label, r in rows.items():
        for ratio, (fig, ref) in quotients.items():
            assert r[ratio] == pytest.approx(r[fig] / rows[ref][fig], rel=1e-9, abs=0), (label, ratio)
        assert r["train_state_mb"] == pytest.approx(r["saved_tensors_mb"] + r["grad_mb"] + r["optimizer_state_mb"])
        assert r["optimizer_state_mb"] == pytest.approx(2 * r["grad_mb"])

    # trainable counts are those of a model built the same way
    for label, r in rows.items():
        torch.manual_seed(0)
        model = pm.create_segmentor(backbone, r["method"], CLASSES, "linear", method_cfg=r["method_cfg"])
        want = pm.parameter_report(model).trainable
        assert want == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert r["trainable_params"] == want, label

    # a frozen backbone keeps far less for backward than full fine-tuning
    ts = {k: r["train_state_mb"] for k, r in rows.items()}
    assert ts["linear"] < ts["spm"] < ts["full"], ts

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | trainable | inference ms | /frozen | step ms | /full | /lora | peak MB")
    for label, r in rows.items():
        assert any(line.startswith(f"| {label} | {r['trainable_params']:,} |") for line in table), (label, table)


def test_cost_tool_rejects_an_unknown_method(tmp_path):
    proc = _run("--backbone", "test_resnet", "--variant", "spm", "--variant", "nosuchmethod:{}",
                "--out", str(tmp_path / "x.json"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nosuchmethod" in proc.stderr and "unknown method" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_cost_tool_parses_labelled_variants():
    from promptmatch.tools import cost

    assert cost.parse_variant("spm") == ("spm", None, "spm")
    assert cost.parse_variant('spm:{"hidden_dim": 8}') == ("spm", {"hidden_dim": 8}, 'spm:{"hidden_dim": 8}')
    assert cost.parse_variant('late=spm:{"prompt_boundaries":[-2,-1]}') == (
        "spm", {"prompt_boundaries": [-2, -1]}, "late")
    # an '=' inside the JSON is no label
    assert cost.parse_variant('spm:{"a": "x=y"}')[2] == 'spm:{"a": "x=y"}'
