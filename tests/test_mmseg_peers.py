"""The one-line change with each peer method on the shipped ViT-B/16 and ResNet-50 UPerNet
configs (shrunk: tiny backbone, toy dataset, 2 iterations): mmseg's own tools/train.py trains,
this project's tools/test.py reproduces the validation mIoU from the prompt checkpoint; a
method that does not apply to the backbone is refused at build time with a message."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

import promptmatch as pm  # noqa: E402

from mmseg_utils import dataset_block, make_tiny_dataset, python, run, write_backbone_weights  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "spm"
VIT = "spm_vit-b16-upernet_4xb4-40k_ade20k-512x512.py"
R50 = "spm_r50-upernet_4xb4-40k_ade20k-512x512.py"
# (method, config) -> the refusal expected, or None where the method applies
CASES = {
    ("ssf", VIT): None, ("mona", VIT): None, ("rein", VIT): None, ("dora", VIT): None, ("side", VIT): None,
    ("ssf", R50): None, ("side", R50): None,
    ("mona", R50): "mona needs transformer blocks.*ResNetV1c has none",
    ("rein", R50): "rein refines the outputs of transformer blocks.*ResNetV1c has none",
    ("dora", R50): "renames the backbone's state_dict keys.*TimmBackbone",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tinyseg"))


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    import timm
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("w") / "test_vit.safetensors"
    torch.manual_seed(3)
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), str(path))
    return path


def _config(tmp: Path, config: str, method: str, data_root: Path, vit_weights: Path) -> Path:
    """The user's config: the shipped one with the method switched (the one line), then shrunk."""
    user = tmp / f"{method}.py"
    user.write_text(f"_base_ = ['{CONFIG_DIR / config}']\nmodel = dict(method='{method}')  # the one line\n")
    if config == VIT:
        model = (f"backbone=dict(model_name='test_vit', weights='{vit_weights}'),"
                 "neck=dict(in_channels=[64] * 4, out_channels=32),"
                 "decode_head=dict(in_channels=[32] * 4, channels=16, num_classes=3),"
                 "auxiliary_head=dict(in_channels=32, channels=8, num_classes=3),")
    else:
        model = (f"backbone=dict(depth=18, init_cfg=dict(type='Pretrained', checkpoint='{tmp / 'r18.pth'}')),"
                 "decode_head=dict(in_channels=[64, 128, 256, 512], channels=16, num_classes=3),"
                 "auxiliary_head=dict(in_channels=256, channels=8, num_classes=3),")
    tiny = tmp / "tiny.py"
    tiny.write_text(
        f"_base_ = ['./{user.name}']\ncrop_size = (64, 64)\n"
        f"model = dict(data_preprocessor=dict(size=crop_size), {model}\n"
        "             test_cfg=dict(mode='whole'))\n" + dataset_block(data_root))
    if config == R50:
        write_backbone_weights(tiny, tmp / "r18.pth")
    return tiny


@pytest.mark.parametrize("method,config", sorted(CASES), ids=[f"{m}-{c.split('-')[0][4:]}" for m, c in sorted(CASES)])
def test_one_line_change_with_each_peer(method, config, data_root, vit_weights, tmp_path):
    import mmseg

    cfg = _config(tmp_path, config, method, data_root, vit_weights)
    script = str(Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py")
    res = run([python(), script, str(cfg), "--work-dir", str(tmp_path / "work")], cwd=tmp_path)
    out = res.stdout + res.stderr
    refusal = CASES[(method, config)]
    if refusal is not None:
        assert res.returncode != 0 and re.search(refusal, out), out[-4000:]
        return
    assert res.returncode == 0, out[-5000:]
    assert f"promptmatch: {method} on" in out
    hits = re.findall(r"mIoU: ([0-9.]+)", out)
    assert hits, out[-3000:]
    prompts = tmp_path / "work" / "prompts.safetensors"
    meta = pm.read_prompt_metadata(prompts)
    assert meta["method"] == method and meta["num_classes"] == 3
    assert not any(k.startswith("backbone.") for k in meta["tensors"]) or method == "dora"
    assert any(k.startswith("method.") or "lora_" in k for k in meta["tensors"])
    res = run([python(), "tools/test.py", str(cfg), str(prompts), "--work-dir", str(tmp_path / "test")])
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    metrics = json.loads((tmp_path / "test" / "test_metrics.json").read_text())["metrics"]
    assert metrics["mIoU"] == pytest.approx(float(hits[-1]), abs=0.011)
