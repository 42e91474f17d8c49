"""Real multi-process training on the CPU: torchrun + gloo through tools/dist_train.sh.

The processes see no GPU (``CUDA_VISIBLE_DEVICES=""``), so the test means the same on a GPU
machine: with GPUs visible the library takes NCCL and one GPU per process (two processes on a
one-GPU machine cannot do that); the NCCL run is tests/test_cuda.py's."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

from mmseg_utils import make_tiny_dataset, python, run, write_backbone_weights, write_configs  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_on_cpu(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    cfg = write_configs(tmp_path, "upernet_r50", tmp_path / "backbone.pth", data)
    write_backbone_weights(cfg, tmp_path / "backbone.pth")
    out = tmp_path / "sync"
    out.mkdir()
    dist_cfg = tmp_path / "dist.py"
    dist_cfg.write_text(
        f"_base_ = ['./{cfg.name}']\n"
        "custom_imports = dict(imports=['dist_sync_hook'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='DistSyncCheckHook', out_dir='{out}')]\n"
        "train_cfg = dict(max_iters=3, val_interval=3)\n"
        "default_hooks = dict(checkpoint=dict(interval=3))\n"
    )
    work = tmp_path / "work"
    res = run(
        ["bash", "tools/dist_train.sh", str(dist_cfg), "2", "--work-dir", str(work)],
        env_extra={"PYTHON": python(), "PORT": str(_free_port()), "MASTER_ADDR": "127.0.0.1",
                   "PYTHONPATH": str(Path(__file__).parent),
                   "CUDA_VISIBLE_DEVICES": ""},  # gloo on CPUs, also on a GPU machine
        timeout=900,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert "rank 0 of 2 (gloo)" in log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # DDP averaged the gradients: both processes hold the same trainable weights
    c0, c1 = ranks[0]["checksums"]
    assert c0 == pytest.approx(c1, rel=0, abs=1e-9)
    # ... while each saw its own share of the data
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    # exactly one prompt checkpoint per save point, written by rank 0
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.safetensors"))
    assert written == ["prompts.safetensors", "prompts/iter_3.safetensors"], written
