"""The parts of the staging core on their own: stage discovery as data, the probe, layouts and
the hooked forward pass."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import promptmatch as pm
from promptmatch.staging import (
    BoundaryHooks,
    HookedRun,
    Stage,
    StagedBackbone,
    find_stages,
    group_blocks,
    probe_stages,
)
from promptmatch.staging._hooks import run_to_last_stage
from promptmatch.staging._layout import map_dims, map_layout, to_map, token_stride


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))


# ------------------------------------------------------------------ grouping
@pytest.mark.parametrize(
    "num_blocks, num_stages, ends",
    [(12, None, [2, 5, 8, 11]), (12, 3, [3, 7, 11]), (6, None, [1, 2, 4, 5]), (3, None, [0, 1, 2]), (5, 1, [4])],
)
def test_group_blocks_ends_the_last_group_at_the_last_block(num_blocks, num_stages, ends):
    assert group_blocks(num_blocks, num_stages) == ends


@pytest.mark.parametrize("num_stages", [13, -1])
def test_group_blocks_refuses_more_groups_than_blocks(num_stages):
    with pytest.raises(ValueError, match=r"num_stages must be in \[1, 12\]"):
        group_blocks(12, num_stages)


# ----------------------------------------------------------------- discovery
def test_find_stages_reads_feature_info_without_running_the_model(monkeypatch):
    backbone = pm.create_backbone("test_resnet")
    monkeypatch.setattr(backbone, "forward_features", lambda x: pytest.fail("find_stages ran the model"))
    monkeypatch.setattr(backbone, "forward", lambda x: pytest.fail("find_stages ran the model"))
    stages = find_stages(backbone)
    info = {f["module"]: f for f in backbone.feature_info}
    assert [s.module for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert [(s.channels, s.reduction) for s in stages] == [(info[s.module]["num_chs"], info[s.module]["reduction"]) for s in stages]
    assert [s.index for s in stages] == [0, 1, 2, 3]


def test_find_stages_groups_plain_vit_blocks():
    backbone = pm.create_backbone("test_vit")
    n = len(backbone.blocks)
    assert [s.module for s in find_stages(backbone, num_stages=2)] == [f"blocks.{i}" for i in group_blocks(n, 2)]


def test_hand_named_stages_are_unknown_until_probed():
    model = _convnet()
    stages = find_stages(model, ["0", "2"])
    assert stages == (Stage(0, "0", 0, 0), Stage(1, "2", 0, 0))
    probed = probe_stages(model, stages, (64, 64))
    assert probed == (Stage(0, "0", 4, 2), Stage(1, "2", 8, 4))
    assert model.training and not any(m._forward_hooks for m in model.modules())  # left as it was


def test_probe_refuses_a_stage_module_that_returns_no_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), Pair())
    with pytest.raises(ValueError, match=r"stage module '1' \(Pair in Sequential\) returns a tuple of 2 tensors"):
        probe_stages(model, find_stages(model, ["0", "1"]), (32, 32))


# -------------------------------------------------------------------- layout
def test_map_layout_and_dims():
    nchw, nhwc = torch.zeros(1, 8, 4, 6), torch.zeros(1, 4, 6, 8)
    assert map_layout(torch.zeros(1, 10, 8), 8, "NCHW") == "NLC"
    assert map_layout(nchw, 8, "NHWC") == "NCHW"  # the channels tell
    assert map_layout(nhwc, 8, "NCHW") == "NHWC"
    assert map_layout(nhwc, 0, "NCHW") == "NCHW"  # unknown channels: the model's own format
    assert map_layout(nhwc, 0, "NHWC") == "NHWC"
    assert map_dims(nchw, "NCHW") == map_dims(nhwc, "NHWC") == (8, 4, 6)
    with pytest.raises(ValueError, match="5-d"):
        map_layout(torch.zeros(1, 2, 3, 4, 5), 2, "NCHW")


def test_tokens_to_map_and_back_keep_prefix_tokens():
    stage = Stage(0, "blocks.0", 8, 16)
    tokens = torch.randn(2, 5 + 4 * 6, 8)  # 5 prefix tokens, a 4x6 patch grid of a 64x96 image
    fmap, back = to_map(tokens, "NLC", stage, 64, 96)
    assert fmap.shape == (2, 8, 4, 6)
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[:, 5 + 1 * 6 + 2], rtol=0, atol=0)
    torch.testing.assert_close(back(fmap), tokens, rtol=0, atol=0)
    assert token_stride(tokens.shape[1], (64, 96)) == 16
    with pytest.raises(RuntimeError, match=r"stage 0 \(blocks.0\) has 3 tokens"):
        to_map(tokens[:, :3], "NLC", stage, 64, 96)


def test_nhwc_map_goes_back_to_nhwc():
    out = torch.randn(1, 4, 6, 8)
    fmap, back = to_map(out, "NHWC", Stage(0, "m", 8, 4), 16, 24)
    assert fmap.shape == (1, 8, 4, 6)
    torch.testing.assert_close(back(fmap), out, rtol=0, atol=0)


# --------------------------------------------------------------------- hooks
def test_boundary_hooks_replace_collect_and_stop_after_the_last_stage():
    model = _convnet().eval()
    stages = probe_stages(model, find_stages(model, ["0", "2"]), (32, 32))
    after_last = []
    model[4].register_forward_hook(lambda m, a, o: after_last.append(o))
    hooks = BoundaryHooks(model, stages, "NCHW")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model[3](model[2](model[1](model[0](x) * 0)))
        after_last.clear()
        hooks.run = HookedRun(lambda i, f: f * 0 if i == 0 else f, 32, 32)
        run_to_last_stage(model, x)
        got = hooks.run.features
        hooks.run = None
    assert after_last == [], "the layers after the last stage must not run"
    assert sorted(got) == [0, 1]
    assert not got[0].any()
    torch.testing.assert_close(got[1], model[2](model[1](model[0](x) * 0)), rtol=0, atol=0)
    assert torch.equal(model[3](got[1]), want)
    hooks.remove()
    assert not any(m._forward_hooks for m in model[:4])


def test_forward_skips_what_follows_the_last_stage():
    backbone = pm.create_backbone("test_vit")
    staged = StagedBackbone(backbone)
    calls = []
    backbone.norm.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        feats = staged.forward(torch.randn(1, 3, 64, 64))
    assert len(feats) == len(staged.stages) and calls == []
    staged.remove()
    with torch.no_grad():
        backbone.forward_features(torch.randn(1, 3, 64, 64))
    assert calls == [1]  # the plain model runs its norm again


def test_hooks_pass_through_outside_a_run():
    model = _convnet().eval()
    staged = StagedBackbone(model, stage_modules=["0", "2"], probe_size=(32, 32))
    x = torch.randn(1, 3, 32, 32)
    assert not staged.active
    with torch.no_grad():
        assert torch.equal(model(x), model[4](model[3](model[2](model[1](model[0](x))))))
