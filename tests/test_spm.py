"""SPM's own switches: every variant starts as the frozen backbone, trains, and does what it says."""
from __future__ import annotations

import pytest
import torch

import promptmatch as pm

from conftest import make_backbone, make_batch

VARIANTS = {
    "default": {},
    "zero-gamma": {"zero_init": "gamma"},
    "native-resolution": {"matcher_stride": 0},
    "unscaled-prompt": {"prompt_scale": "none"},
    "no-recurrence": {"recurrent": False},
    "no-guidance": {"semantic_guidance": False},
    "two-iterations": {"iterations": 2},
    "fewer-boundaries": {"boundaries": (1, 2)},
    "deepest-two": {"boundaries": (-2, -1)},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_variant_is_identity_at_init_and_learns(variant, backbone):
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(backbone, {}), "spm", 3, "linear", method_cfg=VARIANTS[variant])
    images, labels = make_batch(64, num_classes=3)
    with torch.no_grad():
        want = model.staged.forward(images)
        got, _ = model.forward_features(images)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(3):
        loss = sum(model.loss(images, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        got, _ = model.forward_features(images)
    # after a few steps the matchers change what the next stages see
    assert not torch.allclose(got[-1], want[-1]), variant


def test_matcher_stride_pools_fine_boundaries():
    """On a stride-4 boundary the default matcher runs on the stride-8 grid; 0 keeps it native."""
    images, labels = make_batch(64, num_classes=3)
    grids, matcher_grids = {}, {}
    for stride in (8, 0):
        model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, method_cfg={"matcher_stride": stride})
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


def test_prompt_scale_follows_the_features():
    """With prompt_scale='feature' the same matcher weights give a prompt proportional to the
    feature scale; with 'none' the prompt does not depend on it."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    for mode, ratio in (("feature", 10.0), ("none", 1.0)):
        from promptmatch.staging import Stage

        m = pm.get_method("spm")([Stage(0, "s", 16, 8)], 3, pm.SPMConfig(prompt_scale=mode))
        with torch.no_grad():
            m.out_proj["0"].weight.normal_()
            small = m.boundary(0, x, m.init_state()) - x
            big = m.boundary(0, 10 * x, m.init_state()) - 10 * x
        torch.testing.assert_close(big, ratio * small, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg, match", [
    ({"matcher_stride": -1}, "matcher_stride must be an int >= 0"),
    ({"prompt_scale": "rms"}, "prompt_scale must be 'feature' or 'none'"),
    ({"zero_init": "all"}, "zero_init must be 'gamma' or 'out_proj'"),
])
def test_bad_spm_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        pm.SPMConfig(**cfg)
