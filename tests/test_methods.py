"""The shared matrix every tuning method goes through: what is frozen stays frozen, the
loss falls on a fixed batch, prompt checkpoints round-trip exactly."""
from __future__ import annotations

import pytest
import torch

import promptmatch as pm

from conftest import make_backbone, make_batch

NUM_CLASSES = 4
BACKBONES = [("vit", "test_vit", {}, 64), ("resnet", "test_resnet", {}, 64)]

# Which registered method applies to which backbone of the matrix. A newly registered method
# fails test_applicability_table_is_complete until it is added here.
APPLIES = {
    ("adaptformer", "vit"): True, ("adaptformer", "resnet"): False,  # transformer blocks only
    ("bitfit", "vit"): True, ("bitfit", "resnet"): True,
    ("full", "vit"): True, ("full", "resnet"): True,
    ("linear", "vit"): True, ("linear", "resnet"): True,
    ("lora", "vit"): True, ("lora", "resnet"): True,  # attention Linears / dense convs
    ("spm", "vit"): True, ("spm", "resnet"): True,
    ("vpt", "vit"): True, ("vpt", "resnet"): False,  # token models only
}


def test_applicability_table_is_complete():
    assert set(APPLIES) == {(m, b[0]) for m in pm.list_methods() for b in BACKBONES}


def build(method, spec, seed=0):
    _, name, kwargs, _ = spec
    torch.manual_seed(seed)
    return pm.create_segmentor(make_backbone(name, kwargs, seed=seed), method, NUM_CLASSES, "linear")


@pytest.mark.parametrize("spec", BACKBONES, ids=[b[0] for b in BACKBONES])
@pytest.mark.parametrize("method", pm.list_methods())
def test_method_matrix(method, spec, tmp_path):
    assert (method, spec[0]) in APPLIES, f"add {method!r} to APPLIES"
    if not APPLIES[method, spec[0]]:
        with pytest.raises(pm.MethodNotApplicableError) as info:
            build(method, spec)
        assert method in str(info.value) and type(make_backbone(spec[1], spec[2])).__name__ in str(info.value)
        return  # refused, as it must be: nothing to train
    model = build(method, spec)  # applies: must build (a MethodNotApplicableError fails the test)
    side = spec[3]
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.backbone.named_buffers()}
    assert model.train() is model
    assert model.backbone.training == (not model.staged.frozen)
    images, labels = make_batch(side, n=4, num_classes=NUM_CLASSES)
    opt = torch.optim.AdamW(model.param_groups(lr=3e-3))
    history = []
    for _ in range(30):
        losses = model.loss(images, labels)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append(float(losses["loss_decode"].detach()))
    assert history[-1] < 0.7 * history[0], history
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen backbone parameter {n} changed"
    if model.staged.frozen:
        for n, b in model.backbone.named_buffers():
            assert torch.equal(b, buffers[n]), f"backbone buffer {n} changed"
    model.eval()
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    fresh = build(method, spec).eval()
    with torch.no_grad():
        pm.load_prompts(fresh, path)
        torch.testing.assert_close(fresh(images), model(images), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k for k in pm.read_prompt_metadata(path)["tensors"]} >= trainable


def test_param_groups_split_backbone_lr():
    model = build("spm", BACKBONES[1])
    groups = model.param_groups(lr=1e-3, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["prompts_and_head"]
    assert sum(p.numel() for g in groups for p in g["params"]) == pm.parameter_report(model).trainable
