"""promptmatch.PerClassIoUMetric (and its agreement with promptmatch's in-memory mIoU) and
promptmatch.AutocastOptimWrapper (bfloat16 autocast on CPU through PromptEncoderDecoder's train step)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.registry import METRICS, MODELS, OPTIM_WRAPPERS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from promptmatch.mmseg import AutocastOptimWrapper, PerClassIoUMetric  # noqa: E402  registers the promptmatch.* types
from promptmatch.training import confusion_matrix, mean_iou  # noqa: E402

CLASSES = ("road", "car", "tree", "absent", "pred_only")
K = len(CLASSES)
ABSENT, PRED_ONLY = 3, 4
SIDE = 32


# ------------------------------------------------------------------------------------ metric
def _fixed_predictions(n: int = 4, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, label) maps: labels in {0, 1, 2} with ~15% ignore (255); predictions mostly
    right, with class 4 predicted on labelled pixels (present only in predictions) and class 3
    predicted only on ignored pixels (so it counts as absent from both)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        label = torch.randint(0, 3, (SIDE, SIDE), generator=g)
        ignored = torch.rand(SIDE, SIDE, generator=g) < 0.15
        label[ignored] = 255
        pred = torch.where(torch.rand(SIDE, SIDE, generator=g) < 0.6, label,
                           torch.randint(0, 3, (SIDE, SIDE), generator=g))
        pred[torch.rand(SIDE, SIDE, generator=g) < 0.1] = PRED_ONLY
        pred[ignored] = torch.where(torch.rand(int(ignored.sum()), generator=g) < 0.5, ABSENT, 0)
        pairs.append((pred, label))
    return pairs


def _mmseg_metric(metric, pairs, batch: int = 2) -> Dict[str, float]:
    """Feed (prediction, label) maps to an mmseg metric the way mmseg's evaluator does (data
    samples as dicts with ``pred_sem_seg.data`` and ``gt_sem_seg.data`` of shape 1 x H x W)."""
    metric.dataset_meta = dict(classes=CLASSES)
    for i in range(0, len(pairs), batch):
        samples = [dict(pred_sem_seg=dict(data=p[None]), gt_sem_seg=dict(data=lab[None]))
                   for p, lab in pairs[i:i + batch]]
        metric.process({}, samples)
    return metric.evaluate(len(pairs))


def _promptmatch_miou(pairs) -> Tuple[float, List]:
    conf = sum(confusion_matrix(p.reshape(-1), lab.reshape(-1), K) for p, lab in pairs)
    return mean_iou(conf)


def test_promptmatch_and_mmseg_miou_agree():
    pairs = _fixed_predictions()
    miou, per_class = _promptmatch_miou(pairs)
    mm = _mmseg_metric(PerClassIoUMetric(iou_metrics=["mIoU"]), pairs)
    # mmseg rounds its percentages to 2 decimals
    assert mm["mIoU"] == pytest.approx(100 * miou, abs=0.005 + 1e-9)
    for name, value in zip(CLASSES, per_class):
        if value is None:  # absent from labels and predictions: None here, NaN in mmseg
            assert math.isnan(mm[f"IoU.{name}"]), name
        else:
            assert mm[f"IoU.{name}"] == pytest.approx(100 * value, abs=0.005 + 1e-9), name
    # the edge cases the data is built for
    assert per_class[ABSENT] is None
    assert per_class[PRED_ONLY] == 0.0 and mm["IoU.pred_only"] == 0.0
    assert all(v is not None and 0 < v < 1 for v in per_class[:3])
    # the absent class is left out of both means: 4 classes averaged, not 5
    assert miou == pytest.approx(sum(per_class[:3]) / 4)


def test_per_class_metric_summary_is_mmsegs():
    pairs = _fixed_predictions(seed=1)
    plain = _mmseg_metric(IoUMetric(iou_metrics=["mIoU"]), pairs)
    ours = _mmseg_metric(PerClassIoUMetric(iou_metrics=["mIoU"]), pairs)
    assert set(plain) == {"aAcc", "mIoU", "mAcc"}
    assert set(ours) == set(plain) | {f"IoU.{c}" for c in CLASSES}
    assert {k: ours[k] for k in plain} == plain
    finite = [ours[f"IoU.{c}"] for c in CLASSES if not math.isnan(ours[f"IoU.{c}"])]
    assert plain["mIoU"] == pytest.approx(sum(finite) / len(finite), abs=0.01)


def test_per_class_metric_from_config_with_prefix_and_nan_to_num():
    init_default_scope("mmseg")
    metric = METRICS.build(dict(type="promptmatch.PerClassIoUMetric", iou_metrics=["mIoU"], prefix="val"))
    assert isinstance(metric, PerClassIoUMetric)
    out = _mmseg_metric(metric, _fixed_predictions())
    assert math.isnan(out["val/IoU.absent"]) and out["val/IoU.pred_only"] == 0.0 and "val/mIoU" in out
    out = _mmseg_metric(PerClassIoUMetric(nan_to_num=0), _fixed_predictions())
    assert out["IoU.absent"] == 0.0


# ------------------------------------------------------------------------- autocast wrapper
def _tiny_model():
    init_default_scope("mmseg")
    cfg = dict(
        type="promptmatch.PromptEncoderDecoder",
        backbone=dict(type="promptmatch.TimmBackbone", model_name="test_convnext"),
        decode_head=dict(type="FCNHead", in_channels=64, in_index=3, channels=16, num_convs=1,
                         concat_input=False, num_classes=3, norm_cfg=dict(type="BN", requires_grad=True),
                         align_corners=False),
        data_preprocessor=dict(type="SegDataPreProcessor", size=(SIDE, SIDE)),
        test_cfg=dict(mode="whole"),
    )
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, SIDE, SIDE), generator=g).to(torch.uint8))
        s = SegDataSample(metainfo=dict(img_shape=(SIDE, SIDE), ori_shape=(SIDE, SIDE), pad_shape=(SIDE, SIDE)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, SIDE, SIDE), generator=g))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def test_autocast_wrapper_trains_prompted_model_in_bfloat16_on_cpu():
    model = _tiny_model()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapper = AutocastOptimWrapper(dtype="bfloat16", optimizer=torch.optim.AdamW(trainable, lr=1e-3))
    assert wrapper.cast_dtype == torch.bfloat16 and wrapper.loss_scaler is None
    # convolutions autocast to bfloat16 (normalisations and losses stay float32 under autocast)
    seen: Dict[str, List[torch.dtype]] = {"backbone": [], "head": []}
    stem = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    hooks = [stem.register_forward_hook(lambda m, i, o: seen["backbone"].append(o.dtype)),
             model.decode_head.conv_seg.register_forward_hook(lambda m, i, o: seen["head"].append(o.dtype))]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        for step in range(2):
            log = model.train_step(_batch(step), wrapper)
            assert torch.isfinite(log["loss"]), log
            assert model.divergence_guard.last_step_ok
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"backbone": [torch.bfloat16] * 2, "head": [torch.bfloat16] * 2}, seen
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("method.") for n in changed) and any(n.startswith("decode_head.") for n in changed)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    # outside the step nothing is autocast
    out = model.decode_head.conv_seg(torch.randn(1, 16, 4, 4))
    assert out.dtype == torch.float32


def test_autocast_wrapper_float16_needs_cuda(monkeypatch):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="dtype must be 'bfloat16' or 'float16'"):
        AutocastOptimWrapper(dtype="float32", optimizer=opt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"dtype='float16' needs a CUDA GPU.*use dtype='bfloat16'"):
        AutocastOptimWrapper(dtype="float16", optimizer=opt)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        AutocastOptimWrapper(dtype=torch.float16, optimizer=opt)
    # with CUDA present, float16 is accepted but a model on the CPU is refused at the step
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    wrapper = AutocastOptimWrapper(dtype="float16", optimizer=opt)
    with pytest.raises(RuntimeError, match="autocasts on CUDA only, but the model is on 'cpu'"):
        with wrapper.optim_context(torch.nn.Linear(2, 2)):
            pass


def test_autocast_wrapper_from_config():
    init_default_scope("mmseg")
    from mmengine.optim import build_optim_wrapper

    model = torch.nn.Linear(4, 2)
    wrapper = build_optim_wrapper(model, dict(type="promptmatch.AutocastOptimWrapper", dtype="bfloat16",
                                              optimizer=dict(type="AdamW", lr=1e-3)))
    assert isinstance(wrapper, AutocastOptimWrapper) and "dtype: torch.bfloat16" in repr(wrapper)
    assert OPTIM_WRAPPERS.get("promptmatch.AutocastOptimWrapper") is AutocastOptimWrapper
    with wrapper.optim_context(model):
        y = model(torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    wrapper.update_params(y.float().pow(2).mean())
    assert wrapper.state_dict()["state"]  # AdamW took a step


# ----------------------------------------------------------------------------- Runner
@pytest.mark.slow
def test_runner_with_autocast_wrapper_and_per_class_metric(tmp_path: Path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmseg_utils import make_tiny_dataset

    data_root = make_tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    classes = ("red", "green", "blue")
    ds = dict(type="BaseSegDataset", data_root=str(data_root), metainfo=dict(classes=classes),
              img_suffix=".png", seg_map_suffix=".png", reduce_zero_label=False,
              pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")])
    model = dict(
        type="promptmatch.PromptEncoderDecoder",
        backbone=dict(type="promptmatch.TimmBackbone", model_name="test_convnext"),
        decode_head=dict(type="FCNHead", in_channels=64, in_index=3, channels=16, num_convs=1, concat_input=False,
                         num_classes=3, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False),
        data_preprocessor=dict(type="SegDataPreProcessor", size=(64, 64), mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
        test_cfg=dict(mode="whole"),
    )
    cfg = Config(dict(
        default_scope="mmseg",
        work_dir=str(tmp_path / "work"),
        model=model,
        train_dataloader=dict(batch_size=2, num_workers=0, sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=dict(ds, data_prefix=dict(img_path="img_dir/train", seg_map_path="ann_dir/train"))),
        val_dataloader=dict(batch_size=1, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                            dataset=dict(ds, data_prefix=dict(img_path="img_dir/val", seg_map_path="ann_dir/val"))),
        val_evaluator=dict(type="promptmatch.PerClassIoUMetric", iou_metrics=["mIoU"]),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=2, val_interval=2),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(type="promptmatch.AutocastOptimWrapper", dtype="bfloat16",
                           optimizer=dict(type="AdamW", lr=1e-3)),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=1), checkpoint=None),
        randomness=dict(seed=0),
        env_cfg=dict(cudnn_benchmark=False),
        log_level="WARNING",
    ))
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert isinstance(runner.optim_wrapper, AutocastOptimWrapper)
    hub = runner.message_hub
    assert math.isfinite(float(hub.get_scalar("train/loss").current()))
    per_class = {c: hub.get_scalar(f"val/IoU.{c}").current() for c in classes}
    miou = hub.get_scalar("val/mIoU").current()
    finite = [v for v in per_class.values() if not math.isnan(v)]
    assert finite and miou == pytest.approx(sum(finite) / len(finite), abs=0.01)
