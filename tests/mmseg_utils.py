"""Helpers for the mmseg integration tests: a tiny dataset and shrunk configs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
SIDE = 64

# mmseg-shipped configs (inherited with the `mmseg::` prefix) and the overrides that shrink
# them to tiny images; `backbone_weights` says whether to write a local pretrained file.
SHIPPED = {
    "upernet_r50": dict(
        base="mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py",
        model="""
            pretrained=None,
            backbone=dict(depth=18, init_cfg=dict(type='Pretrained', checkpoint='{weights}')),
            decode_head=dict(in_channels=[64, 128, 256, 512], channels=16, num_classes={K}),
            auxiliary_head=dict(in_channels=256, channels=8, num_classes={K}),""",
    ),
    "segformer_mit-b0": dict(
        base="mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py",
        model="""
            pretrained=None,
            backbone=dict(embed_dims=16, num_layers=[1, 1, 1, 1], init_cfg=dict(type='Pretrained', checkpoint='{weights}')),
            decode_head=dict(in_channels=[16, 32, 80, 128], channels=16, num_classes={K}),""",
    ),
    "vit-b16_upernet": dict(
        base="mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py",
        model="""
            pretrained=None,
            backbone=dict(img_size=({S}, {S}), embed_dims=32, num_layers=4, num_heads=2, out_indices=(0, 1, 2, 3),
                          init_cfg=dict(type='Pretrained', checkpoint='{weights}')),
            neck=dict(in_channels=[32, 32, 32, 32], out_channels=32),
            decode_head=dict(in_channels=[32, 32, 32, 32], channels=16, num_classes={K}),
            auxiliary_head=dict(in_channels=32, channels=8, num_classes={K}),""",
    ),
    "swin-t_upernet": dict(
        base="mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
        model="""
            pretrained=None,
            backbone=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          pretrain_img_size={S}, init_cfg=dict(type='Pretrained', checkpoint='{weights}')),
            decode_head=dict(in_channels=[16, 32, 64, 128], channels=16, num_classes={K}),
            auxiliary_head=dict(in_channels=64, channels=8, num_classes={K}),""",
    ),
}


def make_tiny_dataset(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> Path:
    """A learnable toy dataset in mmseg layout: quadrants whose colour gives the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220]], dtype=np.float32)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            q = rng.integers(0, NUM_CLASSES, (2, 2))
            lab = np.kron(q, np.ones((SIDE // 2, SIDE // 2), dtype=np.int64)).astype(np.uint8)
            img = palette[lab] + rng.normal(0, 20, (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img_dir" / split / f"{i}.png")
            Image.fromarray(lab).save(root / "ann_dir" / split / f"{i}.png")
    return root


def dataset_block(data_root: Path) -> str:
    return textwrap.dedent(
        f"""
        metainfo = dict(classes=('red', 'green', 'blue'), palette=[[220, 40, 40], [40, 200, 60], [40, 60, 220]])
        _pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
        _ds = dict(type='BaseSegDataset', data_root='{data_root}', metainfo=metainfo, img_suffix='.png',
                   seg_map_suffix='.png', reduce_zero_label=False, pipeline=_pipeline)
        train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                                sampler=dict(type='InfiniteSampler', shuffle=True),
                                dataset=dict(_ds, data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train')),
                                _delete_=True)
        val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              dataset=dict(_ds, data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val')),
                              _delete_=True)
        test_dataloader = val_dataloader
        val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
        test_evaluator = val_evaluator
        train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2, _delete_=True)
        param_scheduler = []
        optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.0), _delete_=True)
        default_hooks = dict(checkpoint=dict(interval=2, by_epoch=False), logger=dict(interval=1),
                             visualization=dict(draw=False))
        randomness = dict(seed=0)
        env_cfg = dict(cudnn_benchmark=False)
        """
    )


def write_configs(tmp: Path, name: str, weights: Path, data_root: Path) -> Path:
    """The user's one-line config and the tiny config that inherits it; returns the tiny one."""
    spec = SHIPPED[name]
    user = tmp / f"{name}_spm.py"
    user.write_text(
        f"_base_ = ['{spec['base']}']\n"
        "model = dict(type='promptmatch.PromptEncoderDecoder')  # the one added line\n"
    )
    model = textwrap.dedent(spec["model"]).format(weights=weights, K=NUM_CLASSES, S=SIDE)
    tiny = tmp / f"{name}_tiny.py"
    tiny.write_text(
        f"_base_ = ['./{user.name}']\n"
        f"crop_size = ({SIDE}, {SIDE})\n"
        f"model = dict(data_preprocessor=dict(size=crop_size), {model}\n)\n" + dataset_block(data_root)
    )
    return tiny


def write_backbone_weights(cfg_path: Path, out: Path) -> Path:
    """Build the (shrunk) config's backbone once and save its weights as a 'pretrained' file."""
    import torch
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(cfg_path))
    bb = dict(cfg.model.backbone)
    bb.pop("init_cfg", None)
    bb.pop("pretrained", None)
    torch.manual_seed(0)
    backbone = MODELS.build(bb)
    backbone.init_weights()
    torch.save(backbone.state_dict(), out)
    return out


def run(cmd, cwd=REPO, timeout=900, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    if env_extra:
        env.update(env_extra)
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return res


def python():
    return sys.executable
