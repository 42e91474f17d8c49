"""What is specific to the peer methods ``ssf``, ``mona``, ``rein``, ``dora`` and ``side`` (the shared
matrix of tests/test_methods.py runs them through the method contract on a tiny ViT and ResNet).

Trainable parameters of each method, decode head excluded, on randomly initialised timm
ViT-B/16 (``vit_base_patch16_224``, 12 blocks of width 768, staged in 4 groups of 3 blocks) and
ResNet-50 (``resnet50``), checked in :func:`test_parameter_counts`:

========  ===========  ===========  =========================================================
method    ViT-B/16     ResNet-50    what the paper reports (backbone part)
========  ===========  ===========  =========================================================
ssf         204,288      106,240    SSF, ViT-B/16: "about 0.3M" on FGVC / VTAB-1k, heads
                                    included (a 100-class head alone is 0.08M)
mona      2,684,928      refused    Mona: under 5% of the backbone (Swin); here 3.1% of ViT-B
rein      1,347,840      refused    Rein, DINOv2-L: 2.99M with the Mask2Former query link; the
                                    same formula without it gives 2.53M for ViT-L (24 x 1024)
dora        322,560      305,856    DoRA: LoRA's count plus one magnitude per output channel
                                    (lora: 294,912 and 302,080)
side        255,488      389,376    linear decoder (up-projections at the last level only)
side        405,248      505,856    multilevel decoder; E3VA's own counts are for its
                                    block-wise adapters and not comparable
========  ===========  ===========  =========================================================
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import promptmatch as pm
from promptmatch.methods import DoRAConfig, MonaConfig, ReinConfig, SideAdapterConfig, SSFConfig
from promptmatch.methods.mona import MonaAdapter

from conftest import make_backbone, make_batch

NUM_CLASSES = 4
SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)), 64)
PVT = ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64)
DINO_REG = ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=2), 56)
EVA02 = ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=64, num_heads=2), 56)
EFFNET = ("test_efficientnet", {}, 64)
PEERS = ("ssf", "mona", "rein", "dora", "side")


def build(method, name="test_vit", kwargs=None, cfg=None, decoder="linear", seed=0):
    torch.manual_seed(seed)
    return pm.create_segmentor(make_backbone(name, kwargs or {}, seed=seed), method, NUM_CLASSES, decoder,
                               method_cfg=cfg)


def method_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("decode_head"))


def perturb(model, scale=0.05, seed=1):
    """Move every trainable parameter off its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def train_step(model, side):
    images, labels = make_batch(side, n=2, num_classes=NUM_CLASSES)
    model.train()
    sum(model.loss(images, labels).values()).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# ------------------------------------------------------------------ parameter counts
COUNTS = [
    ("ssf", "vit_base_patch16_224", "linear", 204_288), ("ssf", "resnet50", "linear", 106_240),
    ("mona", "vit_base_patch16_224", "linear", 2_684_928),
    ("rein", "vit_base_patch16_224", "linear", 1_347_840),
    ("dora", "vit_base_patch16_224", "linear", 322_560), ("dora", "resnet50", "linear", 305_856),
    ("side", "vit_base_patch16_224", "linear", 255_488), ("side", "resnet50", "linear", 389_376),
    ("side", "vit_base_patch16_224", "multilevel", 405_248), ("side", "resnet50", "multilevel", 505_856),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,backbone,decoder,expected", COUNTS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in COUNTS])
def test_parameter_counts(method, backbone, decoder, expected):
    """The counts of the module docstring (and docs/methods.md), on random weights."""
    model = pm.create_segmentor(pm.create_backbone(backbone), method, 150, decoder)
    assert method_params(model) == expected


def test_parameter_counts_follow_the_formulas_on_a_tiny_vit():
    """The same formulas on test_vit (6 blocks of width 64, MLP ratio 3, 4 stages): SSF 2 x (out
    channels) per adapted op, Mona 2 adapters per block, Rein m*r + r*C per block plus two shared CxC
    Linears, DoRA LoRA + one magnitude per qkv output."""
    c, depth, d = 64, 6, 64
    ssf = build("ssf")
    ops = 3 * c + c + c + 3 * c + c + c  # per block: qkv, proj, norm1, fc1, fc2, norm2
    assert method_params(ssf) == 2 * (depth * ops + c)  # + patch_embed.proj
    mona_one = 4 * c + (c * d + d) + 83 * d + 3 * d + (d * d + d) + (d * c + c)
    assert method_params(build("mona")) == 2 * depth * mona_one
    assert method_params(build("rein")) == depth * (100 * 16 + 16 * c) + 2 * (c * c + c)
    lora = method_params(build("lora"))
    assert method_params(build("dora")) == lora + depth * 3 * c


# ------------------------------------------------------------------ ssf
def test_ssf_adapts_every_op_the_stages_run():
    vit = build("ssf")
    per_block = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    want = ("patch_embed.proj",) + tuple(f"blocks.{i}.{m}" for i in range(6) for m in per_block)
    assert vit.method.adapted_modules == want  # the final norm, after the last stage, is left out
    res = build("ssf", "test_resnet")
    mods = dict(res.backbone.named_modules())
    convs_bns = [n for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert list(res.method.adapted_modules) == convs_bns
    assert all(torch.equal(s, torch.ones_like(s)) for s in vit.method.scales)
    assert all(torch.equal(s, torch.zeros_like(s)) for s in vit.method.shifts)
    only_norms = build("ssf", cfg=SSFConfig(linear=False, conv=False))
    assert all(n.rsplit(".", 1)[-1].startswith("norm") for n in only_norms.method.adapted_modules)
    with pytest.raises(ValueError, match="at least one of linear, conv and norm"):
        SSFConfig(linear=False, conv=False, norm=False)
    with pytest.raises(ValueError, match="SSFConfig.norm must be a bool"):
        SSFConfig(norm=1)


def test_ssf_leaves_out_modules_that_never_run():
    """EVA with separate q/v biases never calls its qkv Linear (it uses the weight directly):
    no scale and shift there, and every trainable parameter gets a gradient."""
    name, kw, side = EVA02
    model = build("ssf", name, kw)
    assert not any(n.endswith("attn.qkv") for n in model.method.adapted_modules)
    assert any(n.endswith("attn.proj") for n in model.method.adapted_modules)
    assert train_step(model, side) == []


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_convnext"])
def test_ssf_merge_folds_into_the_weights(name):
    model = build("ssf", name, decoder="multilevel").eval()
    perturb(model, 0.1)
    images, _ = make_batch(64, n=2)
    with torch.no_grad():
        want = model(images)
        hooks = sum(len(m._forward_hooks) for m in model.backbone.modules())
        merged = model.method.merge()
        got = model(images)
    assert merged == model.method.adapted_modules
    assert sum(len(m._forward_hooks) for m in model.backbone.modules()) == hooks - len(merged)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="nothing to merge"):
        model.method.merge()


def test_ssf_merge_refuses_batchnorm_with_activation_and_changes_nothing():
    name, kw, side = EFFNET
    model = build("ssf", name, kw).eval()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(ValueError, match="cannot fold"):
        model.method.merge()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ mona
@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
@pytest.mark.parametrize("method", ["mona", "rein"])
def test_token_methods_refuse_a_cnn_clearly(method, name):
    backbone = make_backbone(name, {})
    with pytest.raises(pm.MethodNotApplicableError, match=rf"^{method} .*{type(backbone).__name__} has none"):
        pm.create_segmentor(backbone, method, NUM_CLASSES)
    assert getattr(backbone, "_promptmatch_staged", None) is None


@pytest.mark.parametrize("family", [SWIN, PVT, DINO_REG, EVA02], ids=["swin", "pvtv2", "dinov2_reg", "eva02"])
@pytest.mark.parametrize("method", ["mona", "rein"])
def test_token_methods_on_other_transformers(method, family):
    """Swin (NHWC blocks, a width per stage), PVTv2 (grid passed to the blocks), DINOv2 with
    register tokens and EVA-02 (prefix tokens, rope): identity at init, gradients everywhere."""
    name, kw, side = family
    model = build(method, name, kw, decoder="multilevel").eval()
    ref = build("linear", name, kw, decoder="multilevel").eval()
    images, _ = make_batch(side, n=2)
    with torch.no_grad():
        got, _ = model.forward_features(images)
        want, _ = ref.forward_features(images)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert train_step(model, side) == []
    if method == "rein" and family is SWIN:
        assert sorted(model.method.token_proj.keys(), key=int) == ["32", "64", "128", "256"]  # shared per width


def test_mona_convolves_the_patch_grid():
    """The depthwise convolutions see the patch tokens laid out on their grid (prefix tokens
    aside): the same as convolving the map itself."""
    torch.manual_seed(0)
    adapter = MonaAdapter(8, MonaConfig(bottleneck_dim=4))
    fmap = torch.randn(2, 4, 3, 5)
    prefix = torch.randn(2, 1, 4)
    tokens = torch.cat([prefix, fmap.flatten(2).transpose(1, 2)], dim=1)
    got = adapter._spatial(tokens, (3, 5), 1)
    conv = sum(c(fmap) for c in adapter.convs) / 3 + fmap
    assert torch.equal(got[:, :1], prefix)
    torch.testing.assert_close(got[:, 1:], conv.flatten(2).transpose(1, 2))
    nhwc = adapter._spatial(fmap.permute(0, 2, 3, 1), (0, 0), 0)
    torch.testing.assert_close(nhwc, conv.permute(0, 2, 3, 1))


def test_mona_places_two_adapters_per_block_and_takes_non_square_inputs():
    model = build("mona")
    depth = len(model.backbone.blocks)
    assert len(model.method.adapters) == 2 * depth
    assert model.method.adapted_modules == tuple(f"blocks.{i}" for i in range(depth))
    a = model.method.adapters[0]
    assert torch.all(a.s1 == 1e-6) and torch.all(a.s2 == 1.0) and a.dropout == 0.1
    assert [c.kernel_size for c in a.convs] == [(3, 3), (5, 5), (7, 7)]
    perturb(model)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))  # a 4 x 6 patch grid
    assert out.shape == (1, NUM_CLASSES, 64, 96) and not model.method._inputs
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty list of odd"):
        MonaConfig(kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="MonaConfig.dropout"):
        MonaConfig(dropout=1.0)


# ------------------------------------------------------------------ rein
def test_rein_defaults_and_prefix_tokens_pass_unchanged():
    model = build("rein")
    m = model.method
    depth = len(model.backbone.blocks)
    assert len(m.tokens_a) == len(m.tokens_b) == depth
    assert tuple(m.tokens_a[0].shape) == (100, 16) and tuple(m.tokens_b[0].shape) == (16, 64)
    assert list(m.token_proj.keys()) == list(m.out_proj.keys()) == ["64"]  # shared by all layers
    assert torch.count_nonzero(m.out_proj["64"].weight) == 0
    perturb(model)
    out = torch.randn(2, 1 + 16, 64)  # the class token and a 4 x 4 grid
    with torch.no_grad():
        refined = m._block_hook(0, model.backbone.blocks[0], (out,), out)
    assert torch.equal(refined[:, :1], out[:, :1]) and not torch.equal(refined[:, 1:], out[:, 1:])
    with pytest.raises(ValueError, match="ReinConfig.rank must be a positive int"):
        ReinConfig(rank=0)


# ------------------------------------------------------------------ dora
@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_dora_is_identity_at_init_and_trains_magnitudes(name):
    model = build("dora", name).eval()
    ref = build("linear", name).eval()
    images, _ = make_batch(64, n=2)
    with torch.no_grad():
        got, _ = model.forward_features(images)
        want, _ = ref.forward_features(images)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    names = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    mags = [n for n in names if "lora_magnitude_vector" in n]
    assert mags and len(mags) == len(model.method.target_names)
    assert {n.split(".lora_")[1].split(".")[0] for n in names} == {"A", "B", "magnitude_vector"}
    assert model.method.renames_backbone_keys
    with pytest.raises(ValueError, match="DoRAConfig.dropout must be 0"):
        DoRAConfig(dropout=0.1)


# ------------------------------------------------------------------ side
@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_side_runs_the_backbone_without_autograd(name):
    """In a training pass no backbone module runs with autograd on; every trainable parameter
    still gets a gradient, and none of the backbone's does."""
    model = build("side", name, decoder="multilevel")
    leaves = [m for m in model.backbone.modules() if not list(m.children())]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(torch.is_grad_enabled())) for m in leaves]
    try:
        missing = train_step(model, 64)
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen), "a backbone module ran with autograd"
    assert missing == []
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert type(model.method).grad_crosses_backbone is False


def test_side_changes_what_the_decoder_reads_never_the_next_stage():
    model = build("side", "test_resnet", decoder="multilevel").eval()
    perturb(model, 0.2)
    images, _ = make_batch(64, n=2)
    with torch.no_grad():
        state = model.method.init_state()
        boundaries = model.staged.forward(images, on_boundary=lambda i, f: model.method.boundary(i, f, state))
        read = model.method.decoder_features(boundaries, state)
        plain = model.staged.forward(images)
    last = len(plain) - 1
    for i, (b, p) in enumerate(zip(boundaries[:last], plain[:last])):
        assert torch.equal(b, p), f"stage {i + 1} got changed features"
    assert all(not torch.equal(r, p) for r, p in zip(read, plain))  # every level the decoder reads changed
    lin = build("side", "test_resnet")  # a linear head reads the last level only
    assert list(lin.method.up.keys()) == [str(last)] and len(lin.method.down) == last + 1
    with pytest.raises(ValueError, match="SideAdapterConfig.kernel_size must be odd"):
        SideAdapterConfig(kernel_size=4)


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
@pytest.mark.parametrize("method", PEERS)
def test_merged_file_round_trip_and_onnx_export(method, name, tmp_path):
    """A merged segmentor file of each peer rebuilds bit for bit; ONNX export agrees."""
    pytest.importorskip("onnxruntime")
    from promptmatch.export import export_onnx

    if method in ("mona", "rein") and name == "test_resnet":
        pytest.skip("token-block method on a CNN: refused (test_token_methods_refuse_a_cnn_clearly)")
    model = build(method, name, decoder="multilevel").eval()
    perturb(model)
    images, _ = make_batch(64, n=1)
    with torch.no_grad():
        want = model(images)
    loaded = pm.load_segmentor(pm.save_segmentor(model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(images), want)
    report = export_onnx(model, tmp_path / "m.onnx", (64, 64))
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-3
