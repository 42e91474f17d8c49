"""SPM's own switches: every variant starts as the frozen backbone, trains, and does what it says."""
from __future__ import annotations

import json

import pytest
import torch

import promptmatch as pm

from conftest import make_backbone, make_batch

VARIANTS = {
    "default": {},
    "v2": pm.SPMConfig.v2().to_dict(),
    "v3": pm.SPMConfig.v3().to_dict(),
    "zero-gamma": {"zero_init": "gamma"},
    "native-resolution": {"matcher_stride": 0},
    "unscaled-prompt": {"prompt_scale": "none"},
    "no-recurrence": {"recurrent": False},
    "no-guidance": {"semantic_guidance": False},
    "two-iterations": {"iterations": 2},
    "fewer-boundaries": {"boundaries": (1, 2), "backprop_backbone": True},  # lean: the last must have one
    "deepest-two": {"boundaries": (-2, -1)},
    # switches added in v3 and v4, each alone against today's defaults (v4: lean; the switches
    # that choose which boundaries prompt the next stage need backpropagation through it)
    "observe-early": {"prompt_boundaries": (-2, -1), "backprop_backbone": True},
    "prompt-deepest-one": {"prompt_deepest": 1, "backprop_backbone": True},
    "observer-decoder-prompts": {"observer_decoder_prompts": True},
    "observe-only": {"observer_decoder_prompts": False},
    "taps-before-prompt": {"decoder_taps": "before_prompt"},
    "prompt-dropout": {"prompt_dropout": 0.3},
    "prompt-bound": {"prompt_bound": 0.5},
    "confidence-gate": {"gate": "confidence"},
    "soft-interim": {"interim_targets": "soft"},
    "balanced-interim": {"interim_class_balance": True},
    "backprop": {"backprop_backbone": True},
    "read-coarse": {"read_matcher_stride": None},
    "gain-one": {"prompt_gain": 1.0},
}
#: the switches added after v2, each with a value other than its v2 behaviour or today's default
V3_SWITCHES = ("observe-early", "prompt-deepest-one", "observer-decoder-prompts", "observe-only", "taps-before-prompt",
               "prompt-dropout", "prompt-bound", "confidence-gate", "soft-interim", "balanced-interim", "backprop",
               "read-coarse", "gain-one")


def _decode_loss(model, images, labels) -> float:
    """The decode head's loss in eval mode (no prompt dropout), without autograd."""
    model.eval()
    with torch.no_grad():
        out = float(model.loss(images, labels)["loss_decode"])
    model.train()
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_variant_is_identity_at_init_and_learns(variant, backbone):
    """Each variant starts as the frozen backbone, and its matchers alone (the head held
    fixed) lower the loss of the frozen start on a learnable toy batch."""
    torch.manual_seed(0)
    decoder = "multilevel" if variant in V3_SWITCHES else "linear"  # decoder taps need a multi-level decoder
    model = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, decoder, method_cfg=VARIANTS[variant])
    images, labels = make_batch(64, num_classes=3)
    with torch.no_grad():
        want = model.staged.forward(images)
        got, _ = model.forward_features(images)
    assert len(got) == len(want) == len(model.staged.stages) > 0
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    frozen_start = _decode_loss(model, images, labels)
    model.decode_head.requires_grad_(False)  # only the matchers can lower the loss
    opt = torch.optim.AdamW([p for p in model.method.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(6):
        loss = sum(model.loss(images, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = _decode_loss(model, images, labels)
    assert learned < 0.99 * frozen_start, (variant, frozen_start, learned)
    with torch.no_grad():
        got, _ = model.forward_features(images)
    # the matchers change what the next stages see
    assert not torch.allclose(got[-1], want[-1]), variant


def test_matcher_stride_pools_fine_boundaries():
    """On a stride-4 boundary the default matcher runs on the stride-8 grid; 0 keeps it native."""
    images, labels = make_batch(64, num_classes=3)
    grids, matcher_grids = {}, {}
    for stride in (8, 0):
        model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3,
                                    method_cfg=pm.SPMConfig.v3(matcher_stride=stride, prompt_deepest=0))
        first = model.staged.stages[0]
        assert first.reduction == 4
        seen = []  # the grids the first boundary's matcher projections actually run on
        for proj in (model.method.in_proj["0"], model.method.out_proj["0"]):
            proj.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape[-2:]), tuple(o.shape[-2:]))))
        with torch.no_grad():  # a non-zero prompt: one of the two starts at zero
            model.method.gamma["0"].fill_(1.0)
            model.method.out_proj["0"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
            frozen = model.staged.forward(images)
            out, state = model.forward_features(images)
        # the prompt changes the stage's feature at every position of its full grid
        delta = (out[0] - frozen[0]).abs().amax(dim=(0, 1))
        assert delta.shape == (64 // 4, 64 // 4) and bool((delta > 0).all()), (stride, delta)
        grids[stride] = tuple(state["interim"][0].shape[-2:])
        matcher_grids[stride] = set(seen)
    assert grids == {8: (8, 8), 0: (16, 16)}
    assert matcher_grids == {8: {((8, 8), (8, 8))}, 0: {((16, 16), (16, 16))}}


@pytest.mark.parametrize("decoder, pooled", [("linear", {"0": 2}), ("multilevel", {})])
def test_read_matcher_stride_keeps_read_prompts_native(decoder, pooled):
    """read_matcher_stride=0: a matcher whose prompt is read (the decoder reads every level of
    the multi-level head) runs at its boundary's own resolution; an observer nothing reads (the
    stride-4 boundary under a linear head) stays on the matcher_stride grid."""
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, decoder,
                                method_cfg={"read_matcher_stride": 0})
    assert model.staged.stages[0].reduction == 4
    assert model.method.pool == pooled
    _, state = model.forward_features(make_batch(64, num_classes=3)[0])
    assert tuple(state["interim"][0].shape[-2:]) == ((8, 8) if pooled else (16, 16))


def test_prompt_gain_scales_the_prompt():
    from promptmatch.staging import Stage

    x = torch.randn(2, 16, 8, 8)
    prompts = {}
    for gain in (1.0, 4.0):
        torch.manual_seed(0)
        m = pm.get_method("spm")([Stage(0, "s", 16, 8)], 3, pm.SPMConfig(prompt_gain=gain))
        with torch.no_grad():
            m.out_proj["0"].weight.normal_(generator=torch.Generator().manual_seed(0))
            prompts[gain] = m.boundary(0, x, m.init_state()) - x
    torch.testing.assert_close(prompts[4.0], 4 * prompts[1.0], rtol=1e-4, atol=1e-5)


def test_prompt_scale_follows_the_features():
    """With prompt_scale='feature' the same matcher weights give a prompt proportional to the
    feature scale; with 'none' the prompt does not depend on it."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    for mode, ratio in (("feature", 10.0), ("none", 1.0)):
        from promptmatch.staging import Stage

        m = pm.get_method("spm")([Stage(0, "s", 16, 8)], 3, pm.SPMConfig.v3(prompt_scale=mode))
        with torch.no_grad():
            m.out_proj["0"].weight.normal_()
            small = m.boundary(0, x, m.init_state()) - x
            big = m.boundary(0, 10 * x, m.init_state()) - 10 * x
        torch.testing.assert_close(big, ratio * small, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg, match", [
    ({"matcher_stride": -1}, "matcher_stride must be an int >= 0"),
    ({"prompt_scale": "rms"}, "prompt_scale must be 'feature' or 'none'"),
    ({"zero_init": "all"}, "zero_init must be 'gamma' or 'out_proj'"),
    ({"decoder_taps": "frozen"}, "decoder_taps must be 'prompted' or 'before_prompt'"),
    ({"prompt_dropout": 1.0}, "prompt_dropout"),
    ({"prompt_bound": -1}, "prompt_bound must be a finite number"),
    ({"gate": "entropy"}, "gate must be 'none' or 'confidence'"),
    ({"gate": "confidence", "semantic_guidance": False}, "semantic_guidance=False"),
    ({"prompt_boundaries": (1, 1)}, "prompt_boundaries has duplicates"),
    ({"prompt_deepest": -1}, "prompt_deepest must be an int >= 0"),
    ({"interim_targets": "bilinear"}, "interim_targets must be 'nearest' or 'soft'"),
    ({"interim_class_balance": 1}, "interim_class_balance"),
    ({"read_matcher_stride": -2}, "read_matcher_stride must be None or an int >= 0"),
    ({"prompt_gain": 0}, "prompt_gain must be a finite number > 0"),
    ({"backprop_backbone": 0}, "backprop_backbone"),
])
def test_bad_spm_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        pm.SPMConfig(**cfg)


@pytest.mark.parametrize("variant", V3_SWITCHES)
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_v3_switch_gradients_and_checkpoint_round_trip(variant, backbone, tmp_path):
    """Each v3 switch: gradients reach the matchers and heads only (never a frozen backbone
    weight), and a prompt checkpoint reloads into a model with the same switch bit-exactly
    and is refused by one built without it."""
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, "multilevel", method_cfg=cfg)
    images, labels = make_batch(64, num_classes=3)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(2):
        loss = sum(model.loss(images, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.staged.model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("method.", "decode_head.")) for n in trainable), sorted(trainable)[:5]
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable
    assert any(n.startswith("method.out_proj") for n in with_grad) and any(n.startswith("method.cell") for n in with_grad)
    model.eval()
    with torch.no_grad():
        want = model(images)
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    torch.manual_seed(1)
    again = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, "multilevel", method_cfg=cfg).eval()
    pm.load_prompts(again, path)
    with torch.no_grad():
        torch.testing.assert_close(again(images), want, rtol=0, atol=0)
    other = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, "multilevel", method_cfg=pm.SPMConfig.v2())
    with pytest.raises(pm.PromptMismatchError, match="method_config"):
        pm.load_prompts(other, path)


def test_observing_boundaries_add_nothing_and_cost_no_backbone_gradients():
    """A boundary outside prompt_boundaries updates the recurrent state and its interim map
    but hands the features on untouched and has no output projection; the frozen stages
    between it and the first prompting boundary run without autograd."""
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "multilevel",
                                method_cfg=pm.SPMConfig.v3(prompt_boundaries=(-1,), observer_decoder_prompts=False))
    n = len(model.staged.stages)
    assert sorted(model.method.out_proj.keys()) == [str(n - 1)]
    images, labels = make_batch(64, num_classes=3)
    with torch.no_grad():
        model.method.out_proj[str(n - 1)].weight.normal_(0, 0.1)
    frozen = model.staged.forward(images)
    feats, state = model.forward_features(images)
    assert n >= 2 and len(feats) == n
    for i in range(n - 1):
        torch.testing.assert_close(feats[i], frozen[i], rtol=0, atol=0)
        assert not feats[i].requires_grad  # nothing trainable before the last boundary's prompt
    assert not torch.allclose(feats[-1], frozen[-1])
    assert sorted(state["interim"]) == list(range(n))  # every boundary still reads and estimates
    loss = sum(model.loss(images, labels).values())
    loss.backward()
    assert model.method.in_proj["0"].weight.grad is not None  # the early matchers train through h
    with pytest.raises(ValueError, match="not matcher boundaries"):
        pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3,
                            method_cfg={"boundaries": (2, 3), "prompt_boundaries": (1,), "backprop_backbone": True})


def test_decoder_taps_read_before_the_prompt():
    """decoder_taps='before_prompt': the decoder reads each boundary before the last as the
    stage produced it, while the next stage gets the prompted features."""
    torch.manual_seed(0)
    cfg = pm.SPMConfig.v3(decoder_taps="before_prompt", matcher_stride=0, prompt_deepest=0)
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "multilevel", method_cfg=cfg).eval()
    seen = {}
    original = model.method.boundary

    def spy(index, features, state):
        out = original(index, features, state)
        seen[index] = (features, out)
        return out

    model.method.boundary = spy
    with torch.no_grad():
        for p in model.method.out_proj.parameters():
            p.normal_(0, 0.1)
        images, _ = make_batch(64, num_classes=3)
        feats, _ = model.forward_features(images)
    n = len(feats)
    assert n >= 2 and sorted(seen) == list(range(n))
    for i in range(n - 1):
        before, after = seen[i]
        assert feats[i] is before and not torch.equal(before, after)
    assert feats[-1] is seen[n - 1][1]


def _prompts_with_and_without(cfg):
    """The prompt a matcher built with ``cfg`` adds at one boundary, and the one an unlimited
    matcher with the same (large) weights adds."""
    from promptmatch.staging import Stage

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    m = pm.get_method("spm")([Stage(0, "s", 16, 8)], 3, pm.SPMConfig(**cfg))
    ref = pm.get_method("spm")([Stage(0, "s", 16, 8)], 3, pm.SPMConfig(prompt_scale="none"))
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        m.out_proj["0"].weight.normal_(0, 10.0)
        ref.out_proj["0"].weight.copy_(m.out_proj["0"].weight)
        return m.boundary(0, x, m.init_state()) - x, ref.boundary(0, x, ref.init_state()) - x


def test_prompt_bound_limits_the_prompt():
    p, q = _prompts_with_and_without({"prompt_bound": 0.25, "prompt_scale": "none"})
    assert float(p.abs().max()) <= 0.25 + 1e-6 < float(q.abs().max())


def test_confidence_gate_scales_the_prompt():
    p, q = _prompts_with_and_without({"gate": "confidence", "prompt_scale": "none"})
    # zero-initialised interim classifier: uniform maps, every position gated by 1/K
    assert float(q.abs().max()) > 0
    torch.testing.assert_close(p, q / 3, rtol=1e-5, atol=1e-6)


def test_prompt_dropout_drops_whole_prompts_in_training_only():
    from promptmatch.staging import Stage

    torch.manual_seed(0)
    m = pm.get_method("spm")([Stage(0, "s", 16, 8)], 3, pm.SPMConfig(prompt_dropout=0.5, prompt_scale="none"))
    with torch.no_grad():
        m.out_proj["0"].weight.normal_()
    x = torch.randn(64, 16, 4, 4)
    m.eval()
    with torch.no_grad():
        clean = m.boundary(0, x, m.init_state()) - x
    m.train()
    with torch.no_grad():
        p = m.boundary(0, x, m.init_state()) - x
    kept = p.flatten(1).abs().sum(1) > 0
    assert 10 < int(kept.sum()) < 54  # about half the samples keep their prompt
    torch.testing.assert_close(p[kept], 2 * clean[kept], rtol=1e-5, atol=1e-6)


def test_v2_checkpoint_loads_into_a_v2_model():
    """A prompt checkpoint written by SPM v2 (promptmatch 2026-12-01, before the v3 switches
    existed; tests/data/spm_v2) loads into a model built with the v2 settings and gives the
    logits it gave then; a model built with another config refuses it."""
    from pathlib import Path

    data = Path(__file__).parent / "data" / "spm_v2"
    meta = pm.read_prompt_metadata(data / "prompts.safetensors")
    assert "decoder_taps" not in meta["method_config"]  # written before the field existed
    ref = torch.load(data / "reference.pt")
    model = pm.create_segmentor(make_backbone("test_resnet", {}, live_branches=False), "spm", 3, "multilevel",
                                method_cfg=pm.SPMConfig.v2()).eval()
    pm.load_prompts(model, data / "prompts.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["images"]), ref["logits"], rtol=1e-5, atol=1e-5)
    assert pm.SPMConfig() != pm.SPMConfig.v2()  # so the default model must refuse it
    default = pm.create_segmentor(make_backbone("test_resnet", {}, live_branches=False), "spm", 3, "multilevel")
    with pytest.raises(pm.PromptMismatchError, match="SPMConfig.v2"):
        pm.load_prompts(default, data / "prompts.safetensors")


def test_soft_interim_targets_count_every_labelled_pixel():
    """'soft' supervises each cell of a coarse interim map with its class proportions: on a
    grid as fine as the labels it is the plain cross-entropy; an object smaller than a cell,
    which nearest-neighbour targets miss, still pulls its cell towards its class."""
    import torch.nn.functional as F

    from promptmatch.methods.base import _soft_interim_ce

    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, 0, 0] = 255
    logits = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_soft_interim_ce(logits, labels, 255, True, False),
                               F.cross_entropy(logits, labels, ignore_index=255), rtol=1e-5, atol=1e-6)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 5:7, 5:7] = 2  # a 2x2 object inside the first 8x8 cell, away from the pixel nearest picks
    for soft, pulled in ((False, False), (True, True)):
        logits = torch.zeros(1, 3, 2, 2)
        logits[:, 2] = -10.0  # the map is sure there is no class 2 anywhere
        logits.requires_grad_(True)
        _soft_interim_ce(logits, labels, 255, soft, False).backward()
        assert (float(logits.grad[0, 2, 0, 0]) < 0) is pulled  # descent raises class 2 in that cell


def test_balanced_interim_loss_weighs_classes_equally():
    """With interim_class_balance, a class of 1% of the pixels counts as much as one of 99%."""
    from promptmatch.methods.base import _soft_interim_ce

    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 0, 0] = 1
    logits = torch.zeros(1, 2, 10, 10, requires_grad=True)
    _soft_interim_ce(logits, labels, 255, True, True).backward()
    g = logits.grad[0]
    # total push towards each class over its own pixels is the same
    torch.testing.assert_close(-g[1, 0, 0], -g[0][labels[0] == 0].sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_observer_decoder_prompts_reach_the_decoder_only(backbone):
    """observer_decoder_prompts: an observing boundary's prompt is in what the decoder reads
    there, while the next stage computes on the unprompted features (so nothing before the
    first prompting boundary needs autograd through the backbone)."""
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, "multilevel",
                                method_cfg=pm.SPMConfig.v3(prompt_deepest=2, observer_decoder_prompts=True)).eval()
    images, _ = make_batch(64, num_classes=3)
    seen = {}
    original = model.method.boundary

    def spy(index, features, state):
        seen[index] = features
        return original(index, features, state)

    model.method.boundary = spy
    with torch.no_grad():
        for p in model.method.out_proj.parameters():
            p.normal_(0, 0.1)
        frozen = model.staged.forward(images)
        through_backbone, _ = model.prompted_features(images)
        decoder_reads, _ = model.forward_features(images)
    n = len(frozen)
    assert n >= 3  # at least one observer before the two prompting boundaries
    for i in range(n - 2):  # observers: the backbone goes on unprompted, the decoder reads a prompt
        torch.testing.assert_close(through_backbone[i], frozen[i], rtol=0, atol=0)
        assert not torch.allclose(decoder_reads[i], frozen[i])
    # the first prompting boundary sees what the frozen backbone computes: no prompt went in before it
    torch.testing.assert_close(seen[n - 2], frozen[n - 2], rtol=0, atol=0)
    assert not torch.allclose(decoder_reads[n - 2], frozen[n - 2])


@pytest.mark.parametrize("version, decoder, prompts_at", [
    ("v3", "linear", [2, 3]), ("v3", "multilevel", [0, 1, 2, 3]), ("v4", "linear", [3]), ("v4", "multilevel", [0, 1, 2, 3])])
def test_observer_prompts_exist_only_where_a_decoder_reads_them(version, decoder, prompts_at):
    """A linear decoder reads the last stage only: the observers (v3: all but the two deepest;
    v4, the default: all but the last) then keep no output projection, and every trainable
    parameter gets a gradient."""
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, decoder,
                                method_cfg=pm.SPMConfig.v3() if version == "v3" else None)
    assert sorted(int(k) for k in model.method.out_proj) == prompts_at
    images, labels = make_batch(64, num_classes=3)
    sum(model.loss(images, labels).values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("decoder", ["linear", "multilevel"])
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_convnext"])
def test_lean_mode_never_runs_the_backbone_with_autograd(backbone, decoder):
    """SPMConfig.lean(): no module of the frozen backbone runs with autograd in a training
    pass, no stage's input needs a gradient, yet every trainable parameter gets one; and
    autograd keeps far less for backward than v3, which backpropagates through the last stages."""
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, decoder, method_cfg=pm.SPMConfig.lean())
    assert model.method.grad_crosses_backbone is False
    assert model.method.prompt_indices == (len(model.staged.stages) - 1,)
    model.train()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(
        (torch.is_grad_enabled(), any(t.requires_grad for t in i if torch.is_tensor(t)))))
        for m in model.backbone.modules() if not list(m.children())]
    images, labels = make_batch(64, num_classes=3)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(model.loss(images, labels).values())
    for h in hooks:
        h.remove()
    assert seen and not any(g for g, _ in seen), "a backbone module ran with autograd on"
    assert not any(r for _, r in seen), "a backbone module got an input that needs a gradient"
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("method.", "decode_head.")) for n in trainable)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    torch.manual_seed(0)
    v3 = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, decoder, method_cfg=pm.SPMConfig.v3()).train()
    v3_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: v3_saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        sum(v3.loss(images, labels).values())
    assert sum(saved) < sum(v3_saved), (sum(saved), sum(v3_saved))


def test_lean_mode_refuses_a_prompt_into_a_frozen_stage():
    """In a pass without autograd through the backbone, a boundary before the last that hands
    on features needing a gradient is an error, not a silently dropped gradient."""
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, method_cfg=pm.SPMConfig.lean()).train()
    original = model.method.boundary
    bump = torch.nn.Parameter(torch.zeros(()))

    def leak(index, features, state):
        out = original(index, features, state)
        return out + bump if index == 0 else out

    model.method.boundary = leak
    images, labels = make_batch(64, num_classes=3)
    with pytest.raises(RuntimeError, match="boundary 0 handed the next stage features that need a gradient"):
        model.loss(images, labels)
    with pytest.raises(ValueError, match="lean mode"):
        pm.SPMConfig(backprop_backbone=False, prompt_boundaries=(-1,))


def test_v3_checkpoint_loads_into_the_v3_model():
    """A prompt checkpoint written by SPM v3 (promptmatch 2026-12-06, before the lean switch
    existed; tests/data/spm_v3, test_resnet, multi-level decoder, three training steps) loads
    into a model built with SPMConfig.v3() and gives the logits it gave then."""
    from pathlib import Path

    data = Path(__file__).parent / "data" / "spm_v3"
    meta = pm.read_prompt_metadata(data / "prompts.safetensors")
    assert "backprop_backbone" not in meta["method_config"]  # written before the field existed
    ref = torch.load(data / "reference.pt")
    for cfg in (pm.SPMConfig.v3(), pm.SPMConfig.v3().to_dict()):
        model = pm.create_segmentor(make_backbone("test_resnet", {}, live_branches=False), "spm", 3, "multilevel", method_cfg=cfg).eval()
        pm.load_prompts(model, data / "prompts.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(model(ref["images"]), ref["logits"], rtol=1e-5, atol=1e-5)
    lean = pm.create_segmentor(make_backbone("test_resnet", {}, live_branches=False), "spm", 3, "multilevel", method_cfg=pm.SPMConfig.lean())
    with pytest.raises(pm.PromptMismatchError, match="method_config"):
        pm.load_prompts(lean, data / "prompts.safetensors")
    for cfg in (pm.SPMConfig.v4(), None):  # None: the defaults, v4 since 2026-12-06
        v4 = pm.create_segmentor(make_backbone("test_resnet", {}, live_branches=False), "spm", 3, "multilevel", method_cfg=cfg)
        with pytest.raises(pm.PromptMismatchError, match=r"(?s)method_config\.backprop_backbone.*trained with "
                                                         r"promptmatch\.SPMConfig\.v3\(\): build the model with "
                                                         r"method_cfg=promptmatch\.SPMConfig\.v3\(\)"):
            pm.load_prompts(v4, data / "prompts.safetensors")


def test_defaults_are_v4_and_cells_relying_on_them_are_versioned():
    """SPM v4 is the default since 2026-12-06; a benchmark cell that leaves one of the fields
    whose default changed to the default names the new defaults' version in its key (so a
    resumed grid never takes a v3 result for it), one that pins them keeps its old key."""
    from promptmatch.benchmark.spec import cell_key

    assert pm.SPMConfig() == pm.SPMConfig.v4() != pm.SPMConfig.v3()
    changed = dict(read_matcher_stride=0, prompt_gain=4.0, backprop_backbone=False)
    assert pm.SPMConfig.defaults_version({}) == 2
    assert pm.SPMConfig.defaults_version(changed) == 1
    assert pm.SPMConfig.defaults_version({"hidden_dim": 32, "prompt_gain": 4.0}) == 2
    assert pm.SPMConfig.defaults_version(pm.SPMConfig.v3().to_dict()) == 1
    assert pm.LoRAConfig.defaults_version({}) == 1
    bb = {"name": "test_resnet"}
    plain = json.loads(cell_key("spm", bb, "d", {}, 0))
    assert plain["defaults"] == 2
    assert "defaults" not in json.loads(cell_key("spm-v4", bb, "d", {}, 0, "spm", changed))
    assert "defaults" not in json.loads(cell_key("lora", bb, "d", {}, 0))


def test_lean_matchers_that_nothing_reads_are_refused():
    """In lean mode (the default) only the last stage's boundary prompts the features: matchers
    elsewhere under a decoder that does not read their stages would train nothing, so the model
    is refused with the fix instead of silently training only its head."""
    with pytest.raises(ValueError, match="no prompt that anything reads.*backprop_backbone=True"):
        pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "linear", method_cfg={"boundaries": (1, 2)})
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "multilevel", method_cfg={"boundaries": (1, 2)})
    assert sorted(model.method.out_proj) == ["1", "2"]  # the multi-level decoder reads them


def test_report_never_pools_seeds_of_old_and_new_defaults():
    """A results file resumed across the change of SPM's defaults holds plain 'spm' records of
    both: the report keeps them apart (the old ones labelled with their defaults' version)."""
    from promptmatch.benchmark.report import aggregate
    from promptmatch.benchmark.spec import cell_key

    bb = {"name": "test_resnet"}

    def key(seed, defaults):
        k = json.loads(cell_key("spm", bb, "d", {}, seed))
        return json.dumps({n: v for n, v in k.items() if n != "defaults" or defaults}, sort_keys=True)

    recs = [{"key": key(seed, defaults), "dataset": "d", "backbone": bb, "setting_label": "s", "method": "spm",
             "seed": seed, "status": "ok", "miou": {"val": val}}
            for seed, defaults, val in ((0, False, 0.5), (1, False, 0.52), (0, True, 0.7))]
    rows = {r["method"]: r for r in aggregate(recs)}
    assert sorted(rows) == ["spm", "spm (defaults v1)"]
    assert rows["spm"]["n_seeds"] == 1 and rows["spm (defaults v1)"]["n_seeds"] == 2
