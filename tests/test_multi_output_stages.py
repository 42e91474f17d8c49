"""Backbones whose stage modules return several tensors (HRNet and the like).

A stage module must return one tensor (the matcher replaces it). One that returns a list,
tuple or dict is refused when the segmentor is built, never at the first forward; timm's
HighResolutionNet and mmseg's HRNet get stages that return one tensor each by default.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import promptmatch as pm

from conftest import make_batch

K = 3
SIDE = 64
HRNET = "hrnet_w18_small"


def _unstaged(model: nn.Module) -> bool:
    """No promptmatch state or hook left on the model."""
    return getattr(model, "_promptmatch_staged", None) is None and not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------- timm HRNet
def _hrnet(seed=0):
    torch.manual_seed(seed)
    return pm.create_backbone(HRNET)


def test_timm_hrnet_stages_are_the_features_only_maps():
    import timm

    backbone = _hrnet()
    plain = copy.deepcopy(backbone).eval()
    model = pm.create_segmentor(backbone, "spm", K, "multilevel")
    stages = model.staged.stages
    assert [s.module for s in stages] == [f"incre_modules.{i}" for i in range(4)]
    assert [s.channels for s in stages] == [128, 256, 512, 1024]
    assert [s.reduction for s in stages] == [4, 8, 16, 32]
    # the maps the matchers sit on are exactly what timm's features_only model returns
    feats_model = timm.create_model(HRNET, features_only=True, out_indices=(1, 2, 3, 4))
    missing, _ = feats_model.load_state_dict(plain.state_dict(), strict=False)
    assert not missing
    images, _ = make_batch(SIDE, num_classes=K)
    with torch.no_grad():
        want = feats_model.eval()(images)
        staged = model.staged.forward(images)
        matched, _ = model.forward_features(images)  # zero-initialised matchers: identity
    assert len(want) == len(staged) == 4
    for w, s, m in zip(want, staged, matched):
        torch.testing.assert_close(s, w, rtol=0, atol=0)
        torch.testing.assert_close(m, w, rtol=0, atol=0)


def test_timm_hrnet_trains_with_a_frozen_backbone():
    model = pm.create_segmentor(_hrnet(), "spm", K, "multilevel")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    images, labels = make_batch(SIDE, n=4, num_classes=K)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(3):
        losses = model.loss(images, labels)
        assert {f"loss_interim_{i}" for i in range(4)} <= set(losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
        assert all(p.grad is not None for p in model.method.parameters() if p.requires_grad)
        opt.step()
        history.append(float(loss.detach()))
    assert history[-1] < history[0], history
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    assert all(float(p.weight.detach().abs().max()) > 0 for p in model.method.out_proj.values())


def test_timm_hrnet_multi_branch_stage_modules_are_refused_at_build():
    backbone = _hrnet()
    with pytest.raises(
        ValueError,
        match=r"stage module 'stage2' \(SequentialList in HighResolutionNet\) returns a list of 2 tensors, "
        r"not one tensor.*stage_modules=\[\.\.\.\] naming modules that each return one tensor",
    ):
        pm.create_segmentor(backbone, "spm", K, stage_modules=["stage2", "stage3", "stage4"])
    assert _unstaged(backbone)


# ------------------------------------------------------- a hand-made multi-output
class _TwoWay(nn.Module):
    """A block that returns its two halves as a tuple / list / dict."""

    def __init__(self, ch: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.b = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.kind == "tuple":
            return a, b
        if self.kind == "list":
            return [a, b]
        return {"a": a, "b": b}


class _TinyTwoWay(nn.Module):
    def __init__(self, kind: str = "tuple", with_feature_info: bool = True, max_side: int = 0) -> None:
        super().__init__()
        self.max_side = max_side
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.split = _TwoWay(8, kind)
        self.last = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        if with_feature_info:
            self.feature_info = [dict(module="stem", num_chs=8, reduction=4),
                                 dict(module="split", num_chs=8, reduction=8),
                                 dict(module="last", num_chs=16, reduction=16)]

    def forward_features(self, x):
        if self.max_side and x.shape[-1] > self.max_side:
            raise RuntimeError(f"this model takes inputs of at most {self.max_side} pixels")
        y = self.split(self.stem(x))
        if isinstance(y, dict):
            y = tuple(y.values())
        return self.last(y[0] + y[1])

    def forward(self, x):
        return self.forward_features(x)


@pytest.mark.parametrize(
    "kind, what", [("tuple", "a tuple of 2 tensors"), ("list", "a list of 2 tensors"), ("dict", r"a dict with keys \['a', 'b'\]")]
)
@pytest.mark.parametrize("named", [False, True], ids=["feature_info", "stage_modules"])
def test_multi_output_stage_module_is_refused_at_build(kind, what, named):
    torch.manual_seed(0)
    backbone = _TinyTwoWay(kind, with_feature_info=not named)
    stage_modules = ["stem", "split", "last"] if named else None
    with pytest.raises(ValueError, match=rf"stage module 'split' \(_TwoWay in _TinyTwoWay\) returns {what}, not one tensor"):
        pm.create_segmentor(backbone, "spm", K, stage_modules=stage_modules)
    assert _unstaged(backbone)


def test_one_tensor_stages_of_the_same_backbone_work():
    torch.manual_seed(0)
    model = pm.create_segmentor(_TinyTwoWay("tuple"), "spm", K, stage_modules=["stem", "split.a", "last"])
    assert [(s.channels, s.reduction) for s in model.staged.stages] == [(8, 4), (8, 8), (16, 16)]
    images, labels = make_batch(SIDE, num_classes=K)
    sum(model.loss(images, labels).values()).backward()


def test_probe_that_cannot_run_does_not_block_feature_info_stages():
    # the build-time probe uses 224x224; a model that cannot take it still builds from feature_info
    torch.manual_seed(0)
    backbone = _TinyTwoWay("tuple", with_feature_info=False, max_side=128)
    backbone.feature_info = [dict(module="stem", num_chs=8, reduction=4),
                             dict(module="split.b", num_chs=8, reduction=8),
                             dict(module="last", num_chs=16, reduction=16)]
    model = pm.create_segmentor(backbone, "spm", K)
    assert [s.module for s in model.staged.stages] == ["stem", "split.b", "last"]
    images, labels = make_batch(SIDE, num_classes=K)
    sum(model.loss(images, labels).values()).backward()


# ------------------------------------------------------------------ mmseg HRNet
_MM_CH = (4, 8, 16, 32)


def _mmseg_hrnet_model(model_type="promptmatch.PromptEncoderDecoder", **extra):
    from mmengine.config import ConfigDict
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    bn = dict(type="BN", requires_grad=True)
    stages = dict(  # fcn_hr18's HRNet with tiny widths and one block per branch
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(1,), num_channels=(8,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(1, 1), num_channels=_MM_CH[:2]),
        stage3=dict(num_modules=1, num_branches=3, block="BASIC", num_blocks=(1, 1, 1), num_channels=_MM_CH[:3]),
        stage4=dict(num_modules=2, num_branches=4, block="BASIC", num_blocks=(1, 1, 1, 1), num_channels=_MM_CH),
    )
    init_default_scope("mmseg")
    cfg = dict(
        type=model_type,
        backbone=dict(type="HRNet", norm_cfg=bn, norm_eval=False, extra=stages),
        decode_head=dict(type="FCNHead", in_channels=list(_MM_CH), in_index=(0, 1, 2, 3), channels=sum(_MM_CH),
                         input_transform="resize_concat", kernel_size=1, num_convs=1, concat_input=False,
                         dropout_ratio=-1, num_classes=K, norm_cfg=bn, align_corners=False),
        data_preprocessor=dict(type="SegDataPreProcessor", size=(SIDE, SIDE)),
        test_cfg=ConfigDict(mode="whole"),
        **extra,
    )
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def _mmseg_batch(n=4):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    images, labels = make_batch(SIDE, n=n, num_classes=K)
    samples = []
    for lab in labels:
        s = SegDataSample(metainfo=dict(img_shape=(SIDE, SIDE), ori_shape=(SIDE, SIDE), pad_shape=(SIDE, SIDE)))
        s.gt_sem_seg = PixelData(data=lab[None].clone())
        samples.append(s)
    return images, samples


@pytest.mark.slow
def test_mmseg_hrnet_trains_with_matchers_per_branch():
    pytest.importorskip("mmseg")
    model = _mmseg_hrnet_model()
    stages = model.staged.stages
    assert [s.module for s in stages] == [f"stage4.1.branches.{i}" for i in range(4)]
    assert [(s.channels, s.reduction) for s in stages] == list(zip(_MM_CH, (4, 8, 16, 32)))
    plain = _mmseg_hrnet_model("EncoderDecoder")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("method.")})
    images, samples = _mmseg_batch()
    model.eval(), plain.eval()
    with torch.no_grad():  # zero-initialised matchers: exactly the plain model at start
        torch.testing.assert_close(model.extract_feat(images), plain.extract_feat(images), rtol=0, atol=0)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(3):
        losses = model.loss(images, samples)
        assert {f"prompt.loss_interim_{i}" for i in range(4)} <= set(losses)
        loss = sum(v for k, v in losses.items() if "loss" in k)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
        opt.step()
        history.append(float(loss.detach()))
    assert history[-1] < history[0], history
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    # the matched branches go through the last fuse layers: every returned map has changed
    model.eval()
    with torch.no_grad():
        for got, base in zip(model.extract_feat(images), plain.extract_feat(images)):
            assert not torch.allclose(got, base)


@pytest.mark.slow
def test_mmseg_hrnet_multi_branch_stage_modules_are_refused_at_build():
    pytest.importorskip("mmseg")
    with pytest.raises(
        ValueError,
        match=r"stage module 'stage2' \(Sequential in HRNet\) returns a list of 2 tensors, not one tensor.*"
        r"stage_modules=\[\.\.\.\]",
    ):
        _mmseg_hrnet_model(stage_modules=["stage2", "stage3", "stage4"])
