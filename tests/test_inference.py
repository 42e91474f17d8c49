"""Inference paths (whole image, mmseg sliding windows), mixed precision, channels-last
training and the held-out split for picking learning rates."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import promptmatch as pm
from promptmatch.inference import segment_logits, slide_windows
from promptmatch.training import evaluate_segmentor, holdout_split, train_segmentor

from conftest import make_backbone, make_batch

K = 4


class WindowModel(nn.Module):
    """A tiny conv "segmentor" whose output at a pixel depends on the window it sees:
    zero padding at the window's border and the window's mean colour both enter the logits."""

    def __init__(self, k: int = K, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, k, 5, padding=2)
        self.mix = nn.Linear(3, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.mix(x.mean((2, 3)))[:, :, None, None]


def _segmentor(method: str = "spm", seed: int = 0) -> pm.PromptSegmentor:
    torch.manual_seed(seed)
    return pm.create_segmentor(make_backbone("test_resnet", {}, seed=seed), method, K, "linear")


def _reference_slide(model: nn.Module, x: torch.Tensor, windows) -> torch.Tensor:
    """Average of the model's logits over the given (y1, y2, x1, x2) windows, pixel by pixel."""
    n, _, h, w = x.shape
    total = torch.zeros(n, K, h, w)
    count = torch.zeros(h, w)
    with torch.no_grad():
        for y1, y2, x1, x2 in windows:
            total[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])
            count[y1:y2, x1:x2] += 1
    assert bool((count > 0).all())
    return total / count


# 45x37, crop 32, stride 20: two rows (the second shifted back to end at 45) and two columns
ODD_WINDOWS = [(0, 32, 0, 32), (0, 32, 5, 37), (13, 45, 0, 32), (13, 45, 5, 37)]


# ------------------------------------------------------------------------------ slide mode
def test_slide_windows_match_hand_computed_grid():
    assert list(slide_windows(45, 37, 32, 20)) == ODD_WINDOWS
    assert list(slide_windows(20, 28, 32, 20)) == [(0, 20, 0, 28)]  # smaller than the crop: one window
    assert list(slide_windows(64, 64, 32, 32)) == [(0, 32, 0, 32), (0, 32, 32, 64), (32, 64, 0, 32), (32, 64, 32, 64)]
    # rectangular crop and stride; exact fit in height, shifted last column in width
    assert list(slide_windows(30, 25, (10, 12), (10, 8))) == [
        (y, y + 10, x1, x2) for y in (0, 10, 20) for x1, x2 in ((0, 12), (8, 20), (13, 25))]


def test_slide_on_odd_size_equals_explicit_window_loop():
    model = WindowModel().eval()
    x = torch.randn(2, 3, 45, 37, generator=torch.Generator().manual_seed(1))
    out = segment_logits(model, x, mode="slide", crop=32, stride=20)
    assert out.shape == (2, K, 45, 37) and out.dtype == torch.float32
    ref = _reference_slide(model, x, ODD_WINDOWS)
    assert torch.equal(out, ref)
    # the windows matter: sliding is not the same as one whole-image pass here
    assert not torch.allclose(out, segment_logits(model, x), atol=1e-4)


def test_slide_image_smaller_than_crop_is_one_window():
    model = WindowModel().eval()
    x = torch.randn(1, 3, 20, 28, generator=torch.Generator().manual_seed(2))
    out = segment_logits(model, x, mode="slide", crop=(32, 40), stride=(16, 24))
    with torch.no_grad():
        assert torch.equal(out, model(x))


def test_slide_with_a_prompt_segmentor():
    model = _segmentor().eval()
    x = torch.randn(1, 3, 45, 37, generator=torch.Generator().manual_seed(3))
    out = segment_logits(model, x, mode="slide", crop=32, stride=20, num_classes=K)
    assert torch.allclose(out, _reference_slide(model, x, ODD_WINDOWS), atol=1e-5)


@pytest.mark.parametrize("size, crop, stride", [
    ((45, 37), (32, 32), (20, 20)),
    ((20, 28), (32, 32), (20, 20)),
    ((50, 33), (24, 16), (10, 16)),
    ((64, 64), (32, 32), (32, 32)),
])
def test_slide_equals_mmseg_slide_inference(size, crop, stride):
    pytest.importorskip("mmseg")
    from mmseg.models.segmentors import EncoderDecoder  # mmseg installed: a broken one fails here, not skips
    model = WindowModel().eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    fake = SimpleNamespace(test_cfg=SimpleNamespace(crop_size=crop, stride=stride), out_channels=K,
                           encode_decode=lambda img, metas: model(img))
    with torch.no_grad():
        ref = EncoderDecoder.slide_inference(fake, x, [dict(img_shape=size, ori_shape=size)])
    out = segment_logits(model, x, mode="slide", crop=crop, stride=stride)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------ whole mode
def test_whole_mode_is_one_forward_pass():
    model = _segmentor().eval()
    x, _ = make_batch(64, n=2)
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(segment_logits(model, x), ref)
    assert torch.equal(segment_logits(model, x, mode="whole", num_classes=K), ref)
    cl = segment_logits(model, x, channels_last=True)
    assert torch.allclose(cl, ref, atol=1e-5)


def test_segment_logits_runs_without_grad():
    model = WindowModel()
    out = segment_logits(model, torch.randn(1, 3, 16, 16), mode="slide", crop=8, stride=4)
    assert not out.requires_grad


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(mode="slide"), ValueError, "needs both crop and stride"),
    (dict(mode="slide", crop=32), ValueError, "needs both crop and stride"),
    (dict(mode="slide", crop=16, stride=20), ValueError, "stride 20 is larger than crop 16"),
    (dict(mode="slide", crop=(16, 16), stride=(8, 20)), ValueError, r"stride \(8, 20\) is larger than crop"),
    (dict(mode="slide", crop=0, stride=0), ValueError, "crop must be positive"),
    (dict(mode="slide", crop=16, stride=0), ValueError, "stride must be positive"),
    (dict(mode="slide", crop=16, stride=-4), ValueError, "stride must be positive"),
    (dict(mode="slide", crop=(16, 16, 16), stride=8), TypeError, "crop must be an int or an"),
    (dict(mode="slide", crop=16.0, stride=8), TypeError, "crop must be an int or an"),
    (dict(mode="whole", crop=16), ValueError, "apply only to mode='slide'"),
    (dict(mode="tiles"), ValueError, "mode must be 'whole' or 'slide'"),
    (dict(amp="fp16"), ValueError, "amp='fp16' needs a CUDA device"),
    (dict(amp="fp8"), ValueError, "amp must be None, 'bf16' or 'fp16'"),
    (dict(num_classes=5), ValueError, "expected num_classes=5"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        segment_logits(WindowModel(), torch.randn(1, 3, 24, 24), **kwargs)


def test_bad_images_and_model_outputs():
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        segment_logits(WindowModel(), torch.randn(3, 24, 24))
    half = nn.Conv2d(3, K, 2, stride=2)  # logits at half resolution
    with pytest.raises(ValueError, match="at the input resolution"):
        segment_logits(half, torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="at the input resolution"):
        segment_logits(half, torch.randn(1, 3, 24, 24), mode="slide", crop=8, stride=8)


def test_fp16_training_and_evaluation_need_cuda():
    model = _segmentor()
    x, y = make_batch(64, n=2)
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        train_segmentor(model, x, y, steps=1, batch=1, lr=1e-3, amp="fp16")
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        evaluate_segmentor(model, x, y, K, amp="fp16")
    with pytest.raises(ValueError, match="amp must be None"):
        train_segmentor(model, x, y, steps=1, batch=1, lr=1e-3, amp="float16")


# ------------------------------------------------------------------------------ bf16 autocast on CPU
def _record_conv_dtypes(model: nn.Module):
    seen = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype)) for c in convs]
    return seen, hooks


def test_bf16_training_on_cpu_autocasts_and_stays_finite():
    model = _segmentor("spm")
    x, y = make_batch(64, n=4)
    seen, hooks = _record_conv_dtypes(model)
    try:
        run = train_segmentor(model, x, y, steps=3, batch=2, lr=1e-3, seed=0, amp="bf16")
    finally:
        for h in hooks:
            h.remove()
    assert len(run["losses"]) == 3 and all(math.isfinite(v) for v in run["losses"])
    assert run["skipped"] == []
    assert seen and all(d == torch.bfloat16 for d in seen)  # autocast really ran the convolutions in bf16
    # weights stay float32 (autocast casts on the fly) and finite
    own = model.trainable_state_dict()
    assert own and all(v.dtype == torch.float32 for v in own.values() if v.is_floating_point())
    assert not pm.divergence.non_finite_tensors(own)


def test_bf16_training_keeps_the_divergence_guard():
    model = _segmentor("spm")
    x, y = make_batch(64, n=4)
    x[0] = float("nan")  # every batch holding image 0 has a NaN loss
    # with seed 0 and batch 1, steps 0 and 1 draw image 0, steps 2 and 3 image 3
    run = train_segmentor(model, x, y, steps=4, batch=1, lr=1e-3, seed=0, max_bad_steps=4, amp="bf16")
    assert run["skipped"] == [0, 1] and all(math.isfinite(v) for v in run["losses"][2:])
    with pytest.raises(pm.DivergenceError) as info:
        train_segmentor(_segmentor("spm"), x, y, steps=2, batch=1, lr=1e-3, seed=0, amp="bf16")
    assert info.value.step == 0 and info.value.reason == "loss"


def test_bf16_evaluation_is_close_to_fp32():
    model = _segmentor("spm")
    x, y = make_batch(64, n=4)
    train_segmentor(model, x, y, steps=4, batch=2, lr=1e-2, seed=0)
    m32, per32, p32 = evaluate_segmentor(model, x, y, K, batch=2)
    seen, hooks = _record_conv_dtypes(model)
    try:
        m16, per16, p16 = evaluate_segmentor(model, x, y, K, batch=2, amp="bf16")
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert math.isfinite(m16) and abs(m16 - m32) < 0.05
    assert p16.shape == p32.shape and (p16 == p32).float().mean() > 0.95


def test_evaluate_default_is_unchanged_and_slide_mode_works():
    model = _segmentor("linear").eval()
    x, y = make_batch(64, n=3)
    m, per_class, preds = evaluate_segmentor(model, x, y, K, batch=2)
    with torch.no_grad():
        ref = model(x).argmax(1)
    assert torch.equal(preds, ref)
    conf = pm.training.confusion_matrix(ref, y, K)
    assert (m, per_class) == pm.training.mean_iou(conf)
    ms, _, ps = evaluate_segmentor(model, x, y, K, batch=2, mode="slide", crop=48, stride=16)
    logits = segment_logits(model, x, mode="slide", crop=48, stride=16)
    assert math.isfinite(ms) and torch.equal(ps, logits.argmax(1))


# ------------------------------------------------------------------------------ channels-last
def test_channels_last_training_and_evaluation():
    model = _segmentor("spm")
    x, y = make_batch(64, n=4)
    run = train_segmentor(model, x, y, steps=2, batch=2, lr=1e-3, seed=0, channels_last=True)
    assert len(run["losses"]) == 2 and all(math.isfinite(v) for v in run["losses"])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    m, _, _ = evaluate_segmentor(model, x, y, K, batch=2, channels_last=True)
    assert math.isfinite(m)


def test_channels_last_training_matches_default_losses():
    x, y = make_batch(64, n=4)
    a = train_segmentor(_segmentor("linear"), x, y, steps=2, batch=2, lr=1e-3, seed=0)
    b = train_segmentor(_segmentor("linear"), x, y, steps=2, batch=2, lr=1e-3, seed=0, channels_last=True)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_compiled_training_runs(monkeypatch):
    """compile=True runs the loss through torch.compile (seen by a spy on it, and by dynamo
    capturing graphs) and trains as the eager loop does."""
    pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    compiled = []
    real_compile = torch.compile

    def spy(fn, *args, **kwargs):
        compiled.append(fn)
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    counters.clear()
    model = _segmentor("linear")
    x, y = make_batch(64, n=2)
    run = train_segmentor(model, x, y, steps=2, batch=1, lr=1e-3, seed=0, compile=True)
    assert compiled == [model.loss]  # bound methods compare equal by function and instance
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    assert len(run["losses"]) == 2 and all(math.isfinite(v) for v in run["losses"])
    assert not pm.divergence.non_finite_tensors(model.trainable_state_dict())
    eager = train_segmentor(_segmentor("linear"), x, y, steps=2, batch=1, lr=1e-3, seed=0)
    assert run["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------ holdout_split
def test_holdout_split_is_deterministic_and_complete():
    train, hold = holdout_split(10, 0.2, seed=3)
    assert len(hold) == 2 and len(train) == 8
    assert sorted(train + hold) == list(range(10))
    assert train == sorted(train) and hold == sorted(hold)
    assert all(type(i) is int for i in train + hold)
    assert holdout_split(10, 0.2, seed=3) == (train, hold)
    import numpy as np
    perm = np.random.default_rng(3).permutation(10)
    assert hold == sorted(perm[:2].tolist())
    others = {tuple(holdout_split(50, 0.2, seed=s)[1]) for s in range(5)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("n, fraction, held", [(2, 0.5, 1), (3, 0.2, 1), (7, 0.5, 4), (100, 0.1, 10), (4, 0.74, 3)])
def test_holdout_split_sizes(n, fraction, held):
    train, hold = holdout_split(n, fraction)
    assert len(hold) == held == round(fraction * n) and len(train) == n - held


@pytest.mark.parametrize("n, fraction, match", [
    (1, 0.5, "nothing"),
    (10, 0.01, "nothing held out"),
    (10, 0.96, "nothing to train on"),
    (0, 0.5, "nothing"),
    (10, 0.0, "strictly between 0 and 1"),
    (10, 1.0, "strictly between 0 and 1"),
    (10, -0.2, "strictly between 0 and 1"),
    (-1, 0.5, "non-negative int"),
    (2.5, 0.5, "non-negative int"),
])
def test_holdout_split_rejects_degenerate_splits(n, fraction, match):
    with pytest.raises(ValueError, match=match):
        holdout_split(n, fraction)
