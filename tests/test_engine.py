"""The folder engine (promptmatch.engine): mmseg's augmentation without mmcv, the streaming
dataset, the IoU metric, and training/evaluating promptmatch's segmentor through mmengine's
Runner on a tiny generated folder (test_resnet, SPM; 32 px crops, a few iterations)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from promptmatch.datasets.folder import describe_folder_dataset
from promptmatch.engine import (
    FolderSegDataset,
    FolderTrainConfig,
    IoUMetric,
    SegCollate,
    SegmentorModel,
    TrainAugment,
    random_crop,
    rescale_size,
    train_folder,
)
from promptmatch.training import confusion_matrix, mean_iou

CLASSES = ("bg", "left", "right")
PALETTE = np.array([[30, 30, 30], [200, 40, 40], [40, 200, 60]], np.uint8)
SIZES = ((48, 40), (64, 48), (40, 56))  # (w, h): images of mixed sizes


def make_folder(root: Path, counts: Optional[Dict[str, int]] = None, sizes: Sequence[Tuple[int, int]] = SIZES) -> Path:
    """A learnable folder dataset: quadrants of classes 1 and 2 on background 0, colour-coded with
    noise, one row of ignore (255) per mask; PNG images of mixed sizes and a classes.json."""
    counts = counts or {"train": 6, "val": 3}
    seed = 0
    for split, n in counts.items():
        for sub in ("img_dir", "ann_dir"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(seed)
            w, h = sizes[seed % len(sizes)]
            seed += 1
            mask = np.zeros((h, w), np.uint8)
            mask[: h // 2, : w // 2] = 1
            mask[h // 2:, w // 2:] = 2
            mask[int(rng.integers(0, h)), :] = 255
            img = PALETTE[np.minimum(mask, 2)].astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img_dir" / split / f"{i:03d}.png")
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i:03d}.png")
    (root / "classes.json").write_text(json.dumps(list(CLASSES)))
    return root


def tiny_config(folder: Path, out: Path, **kw) -> FolderTrainConfig:
    """A run that takes seconds: test_resnet, SPM, 32 px crops, batch 2, no workers, no bar."""
    args = dict(folder=str(folder), backbone="test_resnet", out=str(out), method="spm", steps=2, batch=2, crop=32,
                lr=1e-3, workers=0, progress=False, log_level="WARNING")
    args.update(kw)
    return FolderTrainConfig(**args)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


# ------------------------------------------------------------------------ augmentation
def test_rescale_size_follows_mmcvs_rule():
    # the larger factor that keeps the long side <= 2048 and the short side <= 512
    assert rescale_size(40, 60, (2048, 512)) == (512, 768)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side limits
    assert rescale_size(512, 512, (2048, 512)) == (512, 512)


def test_random_crop_limits_one_class_share():
    """Columns 0..47 are class 0, 48..63 class 1; a 16-wide crop keeps class 0 under 75 % only
    when it holds 5..11 columns of class 1 (7 of 49 offsets). cat_max_ratio retries for that."""
    label = np.zeros((16, 64), np.int64)
    label[:, 48:] = 1
    label[:2] = 255  # ignored pixels count for no class
    image = np.zeros((16, 64, 3), np.uint8)

    def share(y: np.ndarray) -> float:
        vals, counts = np.unique(y[y != 255], return_counts=True)
        return counts.max() / counts.sum() if len(vals) > 1 else 1.0

    limited = [share(random_crop(image, label, (16, 16), np.random.default_rng(s), 0.75)[1]) for s in range(60)]
    free = [share(random_crop(image, label, (16, 16), np.random.default_rng(s), 1.0)[1]) for s in range(60)]
    assert np.mean([v < 0.75 for v in limited]) > 0.6
    assert np.mean([v < 0.75 for v in free]) < 0.35
    img, lab = random_crop(image, label, (16, 16), np.random.default_rng(0), 0.75)
    assert img.shape == (16, 16, 3) and lab.shape == (16, 16)


def test_augment_shapes_values_and_ignore():
    rng = np.random.default_rng(0)
    h, w = 40, 56
    label = np.zeros((h, w), np.int64)
    label[:, w // 2:] = 2
    label[::7] = 255
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    aug = TrainAugment(crop=(32, 32), scale=(128, 32))  # the recipe's (4 * crop, crop)
    for seed in range(8):
        img, lab = aug(image, label, np.random.default_rng(seed))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[:2] == lab.shape and lab.shape[0] <= 32 and lab.shape[1] <= 32
        assert set(np.unique(lab).tolist()) <= {0, 2, 255}  # nearest resize: no new label values
        assert (lab == 255).any()  # ignore rows survive resize, crop and flip
    # a crop larger than the resized image gives the whole image; the collate pads it
    big = TrainAugment(crop=(64, 64), scale=(128, 32), ratio_range=(0.5, 0.5), photometric=False)
    img, lab = big(image, label, np.random.default_rng(0))
    assert lab.shape == (16, 22)
    batch = SegCollate(pad_to=(64, 64))([{"inputs": torch.ones(3, 16, 22), "labels": torch.from_numpy(lab),
                                          "metas": {}}])
    assert batch["inputs"].shape == (1, 3, 64, 64) and batch["labels"].shape == (1, 64, 64)
    assert (batch["labels"][0, 16:] == 255).all() and (batch["labels"][0, :, 22:] == 255).all()
    assert (batch["inputs"][0, :, 16:] == 0).all() and (batch["inputs"][0, :, :16, :22] == 1).all()


def test_dataset_streams_and_is_deterministic_with_a_seed(folder):
    ds = describe_folder_dataset(folder, splits=("train", "val"))
    aug = TrainAugment(crop=(32, 32))
    a = FolderSegDataset(ds, "train", augment=aug, seed=0)
    b = FolderSegDataset(ds, "train", augment=aug, seed=0)
    c = FolderSegDataset(ds, "train", augment=aug, seed=1)
    items_a = [a[i % len(a)] for i in range(8)]
    items_b = [b[i % len(b)] for i in range(8)]
    items_c = [c[i % len(c)] for i in range(8)]
    for x, y in zip(items_a, items_b):
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["labels"], y["labels"])
    assert any(x["inputs"].shape != z["inputs"].shape or not torch.equal(x["inputs"], z["inputs"])
               for x, z in zip(items_a, items_c))
    assert all(it["inputs"].dtype == torch.float32 and it["labels"].dtype == torch.int64 for it in items_a)
    # evaluation: resized to the test scale, labels at the original size
    val = FolderSegDataset(ds, "val", eval_scale=(128, 32))
    item = val[0]
    h, w = item["metas"]["ori_size"]
    assert item["labels"].shape == (h, w) and min(item["inputs"].shape[1:]) == 32
    assert len(val) == 3 and len(FolderSegDataset(ds, "train", indices=[0, 2])) == 2


# ------------------------------------------------------------------------------- metric
def test_iou_metric_against_a_hand_computed_confusion():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    # confusion (rows: label, cols: pred) over the 6 labelled pixels:
    #   label 0: pred 0, 1    label 1: pred 1, 1    label 2: pred 2, 0
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (2 + 3 - 2) = 2/3, IoU2 = 1 / (2 + 1 - 1) = 1/2
    metric = IoUMetric(4, class_names=["a", "b", "c", "d"])  # class d never occurs: nan, left out
    metric.process(None, [{"pred": pred[:1], "label": label[:1]}, {"pred": pred[1:], "label": label[1:]}])
    m = metric.compute_metrics(metric.results)
    assert m["IoU.a"] == pytest.approx(1 / 3) and m["IoU.b"] == pytest.approx(2 / 3)
    assert m["IoU.c"] == pytest.approx(1 / 2) and np.isnan(m["IoU.d"])
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(4 / 6)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # the same definition as the in-memory engine's mean_iou
    assert m["mIoU"] == pytest.approx(mean_iou(confusion_matrix(pred.flatten(), label.flatten(), 4))[0])


# ---------------------------------------------------------------------- Runner training
class _Outputs:
    """An mmengine hook that keeps every training iteration's logged losses."""

    def __new__(cls):
        from mmengine.hooks import Hook

        class Keep(Hook):
            priority = "LOW"

            def __init__(self):
                self.outputs = []

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                self.outputs.append({k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                                     for k, v in outputs.items()})

        return Keep()


def test_train_a_few_steps_with_spm(folder, tmp_path):
    keep = _Outputs()
    result = train_folder(tiny_config(folder, tmp_path / "run"), hooks=[keep])
    assert result["iters"] == [0, 1] and all(np.isfinite(result["losses"]))
    # the loss is the segmentor's own: the decode loss plus SPM's interim losses, summed
    out = keep.outputs[0]
    interim = [k for k in out if k.startswith("loss_interim_")]
    assert "loss_decode" in out and interim
    assert out["loss"] == pytest.approx(out["loss_decode"] + sum(out[k] for k in interim), rel=1e-5)
    assert 0.0 <= result["val_miou"] <= 1.0
    assert set(result["metrics"]) >= {"mIoU", "aAcc", "IoU.bg", "IoU.left", "IoU.right"}
    run = tmp_path / "run"
    for name in ("prompts.safetensors", "segmentor.safetensors", "metrics.json", "train_config.json", "iter_2.pth"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["val_miou"] == pytest.approx(result["val_miou"])
    import promptmatch as pm

    meta = pm.read_prompt_metadata(run / "prompts.safetensors")
    assert meta["method"] == "spm" and meta["extra"]["engine"] == "runner"
    assert meta["extra"]["val_miou"] == pytest.approx(result["val_miou"])
    # the Runner's checkpoint holds what a prompt checkpoint holds, not the frozen backbone
    ckpt = torch.load(run / "iter_2.pth", map_location="cpu", weights_only=False)
    seg = result["segmentor"]
    assert set(ckpt["state_dict"]) == {f"segmentor.{k}" for k in seg.trainable_state_dict()}
    assert not any(k.startswith("segmentor.backbone.") for k in ckpt["state_dict"])


def test_bf16_autocast_on_cpu(folder, tmp_path):
    """bf16 on a CPU: the forward pass runs under autocast (mmengine's AmpOptimWrapper is CUDA only)."""
    from promptmatch.engine.model import AutocastWrapper, build_optim_wrapper

    import promptmatch as pm

    seg = pm.create_segmentor("test_resnet", "spm", 3)
    wrapper = build_optim_wrapper(seg, 1e-3, 0.05, "bf16", "cpu")
    assert isinstance(wrapper, AutocastWrapper)
    with wrapper.optim_context(seg):
        assert seg(torch.randn(1, 3, 64, 64)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        build_optim_wrapper(seg, 1e-3, 0.05, "fp16", "cpu")
    result = train_folder(tiny_config(folder, tmp_path / "run", amp="bf16", save_merged=False))
    assert all(np.isfinite(result["losses"])) and result["val_miou"] is not None


def test_state_dict_round_trip_fills_the_frozen_backbone():
    import promptmatch as pm

    torch.manual_seed(0)
    seg = pm.create_segmentor("test_resnet", "spm", 3)
    model = SegmentorModel(seg)
    state = model.state_dict()
    assert state and not any(k.startswith("segmentor.backbone.") and k[len("segmentor."):] not in
                             seg.trainable_state_dict() for k in state)
    torch.manual_seed(1)
    other = SegmentorModel(pm.create_segmentor("test_resnet", "spm", 3))
    frozen_before = {k: v.clone() for k, v in other.segmentor.backbone.state_dict().items()}
    other.load_state_dict(state, strict=True)  # strict: the frozen weights come from the model itself
    for k, v in other.segmentor.trainable_state_dict().items():
        assert torch.equal(v, seg.trainable_state_dict()[k])
    for k, v in other.segmentor.backbone.state_dict().items():
        assert torch.equal(v, frozen_before[k])


class _StopAfter(Exception):
    pass


def _stop_hook(at: int):
    from mmengine.hooks import Hook

    class Stop(Hook):
        priority = "LOWEST"  # after the CheckpointHook saved this iteration

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter + 1 >= at:
                raise _StopAfter(f"interrupted after iteration {at}")

    return Stop()


def test_checkpoint_and_resume_continue_from_the_saved_iteration(folder, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(folder, out, steps=4, checkpoint_interval=2)
    with pytest.raises(_StopAfter):
        train_folder(cfg, hooks=[_stop_hook(2)])
    assert (out / "iter_2.pth").is_file() and not (out / "iter_4.pth").exists()
    assert not (out / "prompts.safetensors").exists()  # an interrupted run writes no prompts
    resumed = train_folder(tiny_config(folder, out, steps=4, checkpoint_interval=2, resume=True))
    assert resumed["iters"] == [2, 3]  # it went on from the saved iteration, not from 0
    ckpt = torch.load(out / "iter_4.pth", map_location="cpu", weights_only=False)
    assert ckpt["meta"]["iter"] == 4
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {4}  # AdamW's state came back with the checkpoint: 2 + 2 updates
    assert (out / "prompts.safetensors").is_file() and resumed["val_miou"] is not None


# ---------------------------------------------------------------------- benchmark cell
def test_benchmark_cell_on_the_runner_engine(folder, tmp_path):
    """One cell with an lr sweep: the record has the fields of the other engines' records."""
    from promptmatch.benchmark.entries import SETTING_DEFAULTS
    from promptmatch.benchmark.cell import run_cell

    settings = dict(SETTING_DEFAULTS, steps=2, batch=2, image_size=32, lr={"default": [1e-3, 1e-2]}, workers=0,
                    latency_images=1, engine="runner")
    cell = dict(method="spm", backbone={"name": "test_resnet"}, seed=0, settings=settings,
                dataset={"name": "tiny", "source": "folder", "folder": str(folder), "splits": ["val"]})
    rec = run_cell(cell, work_dir=tmp_path / "cell")
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["engine"] == "runner" and rec["lr_chosen"] in (1e-3, 1e-2) and len(rec["lr_trials"]) == 2
    assert all(t["status"] == "ok" and 0 <= t["holdout_miou"] <= 1 for t in rec["lr_trials"])
    for key in ("miou", "per_class_iou", "trainable_params", "backbone_params", "trainable_pct", "parameters",
                "peak_mem_mb", "step_time_median_s", "throughput_img_s", "train_s", "loss_first", "loss_last",
                "lr_used", "skipped_steps", "latency_ms_median", "checkpoint", "checkpoint_bytes", "method_config",
                "wall_s", "versions", "key", "seed", "eval_precision", "device"):
        assert key in rec, key
    assert set(rec["per_class_iou"]["val"]) == set(CLASSES) and 0 <= rec["miou"]["val"] <= 1
    assert rec["eval_precision"] == "float32" and rec["device"].startswith("cpu")
    assert (tmp_path / "cell" / "lr_0" / "train_config.json").is_file()
    assert (tmp_path / "cell" / "prompts.safetensors").is_file()
