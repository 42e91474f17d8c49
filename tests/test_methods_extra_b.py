"""What is specific to ``vpt`` and ``adaptformer`` (the shared matrix is in test_methods.py)."""
from __future__ import annotations

import pytest
import torch

import promptmatch as pm
from promptmatch.methods import AdaptFormerConfig, VPTConfig

from conftest import make_backbone, make_batch

NUM_CLASSES = 4
DINO_REG = ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=2), 56)
EVA02 = ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=64, num_heads=2), 56)


def build(method, name="test_vit", kwargs=None, cfg=None, seed=0):
    torch.manual_seed(seed)
    backbone = make_backbone(name, kwargs or {}, seed=seed)
    return pm.create_segmentor(backbone, method, NUM_CLASSES, "linear", method_cfg=cfg)


def plain_features(model, images):
    """Boundary features of the backbone with the method's hooks removed."""
    model.method.detach()
    with torch.no_grad():
        return model.staged.forward(images)


def grads_after_one_step(model, side):
    images, labels = make_batch(side, n=2, num_classes=NUM_CLASSES)
    model.train()
    sum(model.loss(images, labels).values()).backward()
    return images


# ------------------------------------------------------------------ adaptformer
def test_adaptformer_is_identity_at_init_and_adapts_every_block():
    model = build("adaptformer").eval()
    depth = len(model.backbone.blocks)
    assert len(model.method.adapters) == depth
    assert model.method.adapted_modules == tuple(f"blocks.{i}.mlp" for i in range(depth))
    images, _ = make_batch(64, n=2)
    with torch.no_grad():
        feats, _ = model.forward_features(images)
        out = model(images)
        head_out = model._decode(plain_features(model, images), images.shape[-2:])
    plain = plain_features(model, images)
    assert len(feats) == len(plain) == len(model.staged.stages) > 0
    for f, g in zip(feats, plain):
        assert torch.equal(f, g)
    assert torch.equal(out, head_out)  # frozen backbone + the same head


def test_adaptformer_trains_adapters_in_every_block_and_only_those():
    model = build("adaptformer")
    grads_after_one_step(model, 64)
    for i, a in enumerate(model.method.adapters):
        # up starts at zero, so only it gets a gradient in the first step (down's is s*up^T...=0)
        assert a.up.weight.grad is not None and a.up.weight.grad.abs().sum() > 0, f"adapter {i} got no gradient"
    assert all(not p.requires_grad for p in model.backbone.parameters())
    dim, r = model.backbone.embed_dim, 64
    per_block = dim * r + r + r * dim + dim
    report = pm.parameter_report(model)
    assert sum(p.numel() for p in model.method.parameters()) == len(model.backbone.blocks) * per_block
    assert report.trainable == sum(p.numel() for p in model.method.parameters()) + sum(
        p.numel() for p in model.decode_head.parameters()
    )


def test_adaptformer_on_eva02_with_swiglu_mlp():
    name, kwargs, side = EVA02
    model = build("adaptformer", name, kwargs, cfg={"bottleneck_dim": 8})
    assert len(model.method.adapters) == 2
    grads_after_one_step(model, side)
    assert all(a.up.weight.grad.abs().sum() > 0 for a in model.method.adapters)


# -------------------------------------------------------------------------- vpt
def test_vpt_deep_and_shallow_parameter_counts():
    deep = build("vpt", cfg={"num_tokens": 5})
    shallow = build("vpt", cfg=VPTConfig(num_tokens=5, deep=False))
    depth, dim = len(deep.backbone.blocks), deep.backbone.embed_dim
    assert tuple(deep.method.prompts.shape) == (depth, 5, dim)
    assert tuple(shallow.method.prompts.shape) == (1, 5, dim)
    assert [n for n, _ in deep.method.named_parameters()] == ["prompts"]
    assert "method.prompts" in deep.trainable_state_dict()
    assert pm.parameter_report(deep).trainable - pm.parameter_report(shallow).trainable == (depth - 1) * 5 * dim
    # VPT's xavier-like uniform init: |p| <= sqrt(6 / (3 * 16 * 16 + dim))
    bound = (6.0 / (3 * 16 * 16 + dim)) ** 0.5
    assert deep.method.prompts.abs().max() <= bound and deep.method.prompts.std() > bound / 4


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("num_tokens", [3, 20])  # 20: more extra prefix tokens than staging's 16 guess
def test_vpt_keeps_feature_grids_and_reaches_every_prompt(deep, num_tokens):
    model = build("vpt", cfg={"num_tokens": num_tokens, "deep": deep})
    images = grads_after_one_step(model, 64)
    grad = model.method.prompts.grad
    assert grad is not None
    assert (grad.flatten(1).abs().sum(1) > 0).all(), "a block's prompts got no gradient (block 0 runs before the first boundary)"
    model.eval()
    with torch.no_grad():
        feats, _ = model.forward_features(images)
        out = model(images)
    plain = plain_features(model, images)
    assert [f.shape for f in feats] == [p.shape for p in plain]
    assert [tuple(f.shape[-2:]) for f in feats] == [(4, 4)] * len(feats)
    assert not torch.allclose(feats[-1], plain[-1])  # the prompts do act on the patch tokens
    assert out.shape == (2, NUM_CLASSES, 64, 64) and torch.isfinite(out).all()


def test_vpt_with_dinov2_registers():
    name, kwargs, side = DINO_REG
    model = build("vpt", name, kwargs, cfg={"num_tokens": 4})
    assert model.backbone.num_prefix_tokens == 5
    seen = []
    h = model.backbone.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    images = grads_after_one_step(model, side)
    h.remove()
    assert seen == [5 + 4 + 16]  # cls + 4 registers + 4 prompts + a 4x4 grid
    assert (model.method.prompts.grad.flatten(1).abs().sum(1) > 0).all()
    with torch.no_grad():
        feats, _ = model.eval().forward_features(images)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 4, 4)] * len(feats)


def test_vpt_with_eva02_rope_skips_prompts_and_detach_restores():
    name, kwargs, side = EVA02
    model = build("vpt", name, kwargs, cfg={"num_tokens": 3, "deep": False})
    attns = [b.attn for b in model.backbone.blocks]
    assert [a.num_prefix_tokens for a in attns] == [1 + 3] * 2
    images = grads_after_one_step(model, side)
    assert model.method.prompts.grad.abs().sum() > 0
    with torch.no_grad():
        feats, _ = model.eval().forward_features(images)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 4, 4)] * len(feats)
    plain = plain_features(model, images)  # detaches
    assert [a.num_prefix_tokens for a in attns] == [1, 1]
    torch.manual_seed(0)
    with torch.no_grad():
        ref = make_backbone(name, kwargs, seed=0).eval().forward_features(images)
        assert torch.equal(model.backbone.forward_features(images), ref)
    assert plain[0].shape == feats[0].shape


def test_no_grad_passes_stay_without_autograd():
    for method in ("vpt", "adaptformer"):
        model = build(method)
        images, _ = make_batch(64, n=1)
        with torch.no_grad():
            out = model(images)
        assert not out.requires_grad


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("method", ["vpt", "adaptformer"])
def test_cnn_backbones_get_a_clear_error(method):
    backbone = make_backbone("test_resnet", {})
    with pytest.raises(pm.MethodNotApplicableError, match=f"{method} needs a .*ResNet has none"):
        pm.create_segmentor(backbone, method, NUM_CLASSES)
    assert getattr(backbone, "_promptmatch_staged", None) is None  # staging undone
    with pytest.raises(pm.MethodNotApplicableError, match="EfficientNet has none"):
        pm.create_segmentor(make_backbone("test_efficientnet", {}), method, NUM_CLASSES)  # has `blocks`, no tokens


@pytest.mark.parametrize(
    "cls,bad,match",
    [
        (VPTConfig, {"num_tokens": 0}, "num_tokens"),
        (VPTConfig, {"num_tokens": 2.5}, "num_tokens"),
        (VPTConfig, {"deep": "yes"}, "deep"),
        (VPTConfig, {"dropout": 1.0}, "dropout"),
        (VPTConfig, {"init": "zeros"}, "init"),
        (AdaptFormerConfig, {"bottleneck_dim": 0}, "bottleneck_dim"),
        (AdaptFormerConfig, {"scale": float("nan")}, "scale"),
        (AdaptFormerConfig, {"dropout": -0.1}, "dropout"),
        (AdaptFormerConfig, {"rank": 4}, "unknown fields"),
    ],
)
def test_bad_configs(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(bad)


def test_defaults_follow_the_papers():
    assert VPTConfig().to_dict() == {"num_tokens": 10, "deep": True, "dropout": 0.1, "init": "xavier_uniform"}
    assert AdaptFormerConfig().to_dict() == {"bottleneck_dim": 64, "scale": 0.1, "dropout": 0.1}
