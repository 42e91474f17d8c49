"""Method-specific checks of the baselines full, bitfit and lora (the shared matrix is in
test_methods.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import promptmatch as pm
from promptmatch.methods import BitFitConfig, FullFineTuneConfig, LoRAConfig
from promptmatch.methods.bitfit import is_bias_parameter

from conftest import make_backbone, make_batch

NUM_CLASSES = 4


def build(name, method, cfg=None, seed=0):
    torch.manual_seed(seed)
    return pm.create_segmentor(make_backbone(name, {}, seed=seed), method, NUM_CLASSES, "linear", method_cfg=cfg)


def test_full_trains_bn_stats_and_uses_lr_mult():
    model = build("test_resnet", "full")
    assert not model.staged.frozen
    assert all(p.requires_grad for p in model.backbone.parameters())
    groups = model.param_groups(lr=1e-3)
    assert [g["name"] for g in groups] == ["backbone", "prompts_and_head"]
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-3)
    model.train()
    assert model.backbone.training
    before = model.backbone.bn1.running_mean.clone()
    images, labels = make_batch(64, n=2)
    sum(model.loss(images, labels).values()).backward()
    assert not torch.equal(before, model.backbone.bn1.running_mean)
    stem = next(n for n, _ in model.backbone.named_parameters())
    assert model.backbone.get_parameter(stem).grad is not None  # the stem trains too
    keys = model.trainable_state_dict()
    assert "backbone.bn1.running_mean" in keys and f"backbone.{stem}" in keys
    model.eval()
    assert not model.backbone.training
    custom = build("test_resnet", "full", {"backbone_lr_mult": 0.5})
    assert custom.param_groups(lr=1.0)[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="backbone_lr_mult"):
        FullFineTuneConfig(backbone_lr_mult=0)


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_bitfit_trains_exactly_the_biases(name):
    model = build(name, "bitfit")
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    # every bias the stages use: a ViT's final norm comes after the last stage, gets no
    # gradient and stays frozen
    after_last_stage = {"norm.bias"} if name == "test_vit" else set()
    assert trainable == {n for n, _ in model.backbone.named_parameters() if is_bias_parameter(n)} - after_last_stage
    assert trainable and all(n.endswith("bias") for n in trainable)
    assert model.staged.frozen
    model.train()
    assert not model.backbone.training  # BatchNorm keeps its pretrained statistics
    images, labels = make_batch(64, n=2)
    sum(model.loss(images, labels).values()).backward()
    # biases before the first stage boundary (stem, first blocks) get gradients too
    used = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    first = "patch_embed.proj.bias" if name == "test_vit" else "bn1.bias"
    assert first in used
    assert model.param_groups(lr=1e-3)[0]["lr"] == pytest.approx(1e-3)
    if name == "test_resnet":  # bias-free convs: only BatchNorm biases exist
        with pytest.raises(ValueError, match="no bias parameters"):
            build(name, "bitfit", {"norm_biases": False})
        return
    no_norm = build(name, "bitfit", {"norm_biases": False})
    nn_ = {n for n, p in no_norm.backbone.named_parameters() if p.requires_grad}
    assert nn_ and nn_ < trainable and not any("norm" in n for n in nn_)


def test_bitfit_config_validation():
    with pytest.raises(ValueError, match="norm_biases"):
        BitFitConfig(norm_biases="yes")


@pytest.mark.parametrize("name,expect", [("test_vit", "attn.qkv"), ("test_resnet", "layer")])
def test_lora_structure_identity_and_grads(name, expect):
    pytest.importorskip("peft")
    model = build(name, "lora")
    ref = build(name, "linear").eval()
    targets = model.method.target_names
    assert targets and all(expect in t for t in targets)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    stage_mods = [s.module for s in model.staged.stages]
    assert stage_mods == [s.module for s in ref.staged.stages]
    model.eval()
    images, labels = make_batch(64, n=2)
    with torch.no_grad():  # lora_B starts at zero: the model equals the frozen backbone
        got, want = model.staged(images), ref.staged(images)
    assert len(got) == len(want) == len(stage_mods) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    assert not model.backbone.training
    sum(model.loss(images, labels).values()).backward()
    missing = [n for n in trainable if "lora_A" in n and model.backbone.get_parameter(n).grad is None]
    assert not missing  # adapters before the first boundary train too
    assert not any(k.startswith("backbone.") and "lora_" not in k for k in model.trainable_state_dict())


def test_lora_options_and_errors():
    pytest.importorskip("peft")
    mlp = build("test_vit", "lora", {"mlp": True, "r": 2, "alpha": 4})
    assert any(t.endswith("mlp.fc1") for t in mlp.method.target_names)
    lin = [m for m in mlp.backbone.modules() if hasattr(m, "scaling")]
    assert lin and all(m.scaling["default"] == pytest.approx(2.0) for m in lin)
    rx = build("test_resnet", "lora", {"target_modules": r"layer4\.\d+\.conv\d"})
    assert rx.method.target_names and all(t.startswith("layer4.") for t in rx.method.target_names)
    drop = build("test_vit", "lora", {"dropout": 0.5})
    drop.train()
    assert any(type(m).__name__ == "_MethodDropout" for m in drop.backbone.modules())
    images, _ = make_batch(64, n=1)
    with torch.no_grad():
        for p in drop.backbone.parameters():
            if p.requires_grad:
                p.normal_()
        assert not torch.equal(drop(images), drop(images))  # dropout acts in training
        drop.eval()
        assert torch.equal(drop(images), drop(images))
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": ""}, {"target_modules": "("},
                {"target_modules": []}, {"mlp": True, "target_modules": ["qkv"]}, {"mlp": 1}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)
    with pytest.raises(pm.MethodNotApplicableError, match="match no module"):
        build("test_vit", "lora", {"target_modules": "nothing_here"})
    with pytest.raises(ValueError, match="stage modules"):
        build("test_resnet", "lora", {"target_modules": ["layer4"]})
    cfg = LoRAConfig(target_modules=["qkv"])
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_import_promptmatch_does_not_import_peft():
    code = "import sys, promptmatch; assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_lora_without_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match=r"pip install promptmatch\[peft\]"):
        build("test_vit", "lora")
