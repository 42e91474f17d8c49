"""Faults that would show on a GPU, shown on the CPU where the same cause can be reproduced
(issue: ready for the first GPU user)."""
from __future__ import annotations

import datetime

import pytest
import timm
import torch

import promptmatch as pm


def _seg(num_classes: int, decoder: str, backbone=None, seed: int = 0):
    torch.manual_seed(seed)
    backbone = backbone if backbone is not None else timm.create_model("test_resnet", pretrained=False)
    seg = pm.create_segmentor(backbone, "spm", num_classes, decoder)
    with torch.no_grad():
        for p in seg.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return seg.eval()


def test_bank_add_follows_the_backbones_device_and_dtype(tmp_path):
    """A bank whose backbone is not on the CPU in float32 (here float64, the same fault as
    CUDA: the matchers and head were built on the default device and dtype) builds each
    dataset's matchers and head where the backbone is, and gives that dataset's logits."""
    backbone = timm.create_model("test_resnet", pretrained=False).double()
    paths = {}
    refs = {}
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    for name, (k, decoder) in {"a": (3, "linear"), "b": (4, "multilevel")}.items():
        seg = _seg(k, decoder, backbone, seed=len(paths)).double()
        with torch.no_grad():
            refs[name] = seg(images)
        paths[name] = pm.save_prompts(seg, tmp_path / f"{name}.safetensors")
    bank = pm.PromptBank(backbone).eval()
    for name, path in paths.items():
        bank.add(name, path)
    assert {p.dtype for p in bank.parameters()} == {torch.float64}
    with torch.no_grad():
        for name in ("b", "a"):
            torch.testing.assert_close(bank(images, name), refs[name], rtol=0, atol=0)


def test_nccl_init_gets_its_timeout_in_seconds(monkeypatch):
    """mmengine's init_dist converts ``timeout`` with ``timedelta(seconds=timeout)``: the benchmark
    must pass a number of seconds (a timedelta raised TypeError at start-up of every GPU run)."""
    mmengine_dist = pytest.importorskip("mmengine.dist", reason="the mmseg stack is not installed")
    import torch.distributed as dist

    from promptmatch.benchmark import runner

    seen = {}

    def fake_init_dist(launcher, backend="nccl", **kwargs):
        seen.update(launcher=launcher, backend=backend, **kwargs)

    monkeypatch.setattr(mmengine_dist, "init_dist", fake_init_dist)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert runner._init_distributed("cuda") == 0
    assert seen["launcher"] == "pytorch" and seen["backend"] == "nccl"
    assert isinstance(seen["timeout"], int) and not isinstance(seen["timeout"], bool)
    # what mmengine 0.10.7 does with it
    assert datetime.timedelta(seconds=seen["timeout"]) == datetime.timedelta(hours=12)


def test_ddp_wrapper_on_gpus_gets_the_settings_of_the_cpu_branch(monkeypatch):
    """The GPU branch used to set only the wrapper type, leaving DDP's own defaults
    (broadcast_buffers=True, find_unused_parameters=False whatever the config says); the CPU
    branch (tested with gloo in tests/test_distributed.py) sets both."""
    pytest.importorskip("mmseg", reason="the mmseg stack is not installed")
    from mmengine.config import Config

    from promptmatch.mmseg import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config(dict(find_unused_parameters=True))
    runtime.prepare_distributed(cfg, "pytorch")
    wrapper = cfg.model_wrapper_cfg
    assert wrapper["type"] == "promptmatch.PromptDistributedDataParallel"
    assert wrapper["broadcast_buffers"] is False
    assert wrapper["find_unused_parameters"] is True
