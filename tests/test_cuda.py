"""The library on a CUDA GPU (marker ``cuda``; skipped, with the reason, where no GPU is usable).

Training and evaluation in bf16 and fp16, prediction, the prompt bank, prompt checkpoints and
merged files between GPU and CPU, ONNX export of a CUDA model, both benchmark engines, and
``torchrun`` with NCCL over the GPUs present. Tiny random-init timm models (``test_vit``,
``test_resnet``) and 64 px images, so the whole file runs in a few minutes on one GPU.
Run on a GPU machine with ``pytest -m cuda`` (``tools/gpu_check.sh`` does, with the smoke run).
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch.training import evaluate_segmentor, train_segmentor

from conftest import make_batch

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[1]
SIDE = 64
K = 4
CUDA = torch.device("cuda")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def exact_fp32():
    """fp32 CUDA results comparable with the CPU's: TF32 off for matmuls and convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(backbone: str = "test_vit", method: str = "spm", decoder: str = "linear", seed: int = 0,
          k: int = K) -> torch.nn.Module:
    """A tiny segmentor (same seed: same backbone weights) whose trainable parts are moved off
    their identity initialisation, in eval mode, on the CPU."""
    torch.manual_seed(seed)
    model = pm.create_segmentor(backbone, method, k, decoder)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def on_cuda(module: torch.nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return bool(tensors) and all(t.device.type == "cuda" for t in tensors)


def trainable_copy(model: torch.nn.Module):
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- training and evaluation
@pytest.mark.parametrize("amp", ["bf16", "fp16", None])
@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_training_and_evaluation_on_cuda(backbone, amp):
    model = build(backbone).to(CUDA)
    images, labels = make_batch(SIDE, n=4, num_classes=K)
    before = trainable_copy(model)
    torch.cuda.reset_peak_memory_stats(CUDA)
    run = train_segmentor(model, images, labels, steps=6, batch=2, lr=1e-3, device=CUDA, amp=amp)
    assert len(run["times"]) == len(run["losses"]) == 6
    assert all(math.isfinite(v) for v in run["losses"]), run["losses"]
    assert torch.cuda.max_memory_allocated(CUDA) > 0
    assert on_cuda(model), "training moved a part of the model off the GPU"
    after = trainable_copy(model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable weight changed"
    assert all(torch.isfinite(v).all() for v in after.values())
    # labels on the GPU as well as on the CPU (the confusion matrix is built on the CPU)
    for y in (labels, labels.to(CUDA)):
        miou, per_class, preds = evaluate_segmentor(model, images.to(CUDA), y, K, batch=2, device=CUDA, amp=amp)
        assert 0.0 <= miou <= 1.0 and len(per_class) == K and preds.shape == labels.shape
    miou_s, _, preds_s = evaluate_segmentor(model, images, labels, K, batch=2, device=CUDA, amp=amp,
                                            mode="slide", crop=48, stride=32)
    assert 0.0 <= miou_s <= 1.0 and preds_s.shape == labels.shape


@pytest.mark.parametrize("method", pm.list_methods())
def test_every_method_trains_a_few_bf16_steps_on_cuda(method):
    """Every registered method on a ViT (the ViT-only ones included), bf16 autocast."""
    model = build("test_vit", method).to(CUDA)
    images, labels = make_batch(SIDE, n=4, num_classes=K)
    run = train_segmentor(model, images, labels, steps=3, batch=2, lr=1e-3, device=CUDA, amp="bf16")
    assert all(math.isfinite(v) for v in run["losses"]), (method, run["losses"])
    assert on_cuda(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images[:1].to(CUDA))
    assert out.shape == (1, K, SIDE, SIDE) and torch.isfinite(out.float()).all()


def test_fp16_training_keeps_fp32_weights_and_finishes_finite():
    """fp16 autocast with a GradScaler (which skips overflowing steps on its own): the weights
    stay float32 and training ends finite, with no step counted as diverged."""
    model = build("test_resnet", "spm").to(CUDA)
    images, labels = make_batch(SIDE, n=4, num_classes=K)
    run = train_segmentor(model, images, labels, steps=6, batch=2, lr=1e-3, device=CUDA, amp="fp16")
    assert all(math.isfinite(v) for v in run["losses"])
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast must not change the weights' dtype"
    assert run["skipped"] == []


# ----------------------------------------------------------------------------- prediction
def test_predict_on_cuda_agrees_with_the_cpu(exact_fp32):
    import numpy as np

    model = build("test_vit")
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((70, 50), (64, 64), (33, 90))]
    ref, ref_logits = pm.predict(model, raw, return_logits=True)
    gpu, gpu_logits = pm.predict(model, raw, return_logits=True, device="cuda")
    assert on_cuda(model)  # predict(device=...) moves the model in place
    for r, g, rl, gl in zip(ref, gpu, ref_logits, gpu_logits):
        assert g.device.type == "cpu" and g.shape == r.shape  # arrays in: maps on the CPU
        torch.testing.assert_close(gl, rl, atol=1e-3, rtol=1e-3)
    # tensors on the GPU in: results on the GPU; slide and bf16 run there too
    x = make_batch(SIDE, n=2)[0].to(CUDA)
    maps = pm.predict(model, x, mode="slide", crop=48, stride=32, amp="bf16")
    assert maps.device.type == "cuda" and maps.shape == (2, SIDE, SIDE)
    fp32 = pm.predict(model, x)
    agree = float((pm.predict(model, x, amp="bf16") == fp32).float().mean())
    assert agree >= 0.7, f"bf16 and fp32 class maps agree on only {agree:.3f} of the pixels"


# ----------------------------------------------------------------------------- prompt bank
@pytest.mark.parametrize("move", ["before_add", "after_add"])
def test_prompt_bank_on_cuda(tmp_path, move, exact_fp32):
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False)
    paths, refs = {}, {}
    images = torch.rand(2, 3, SIDE, SIDE)
    for i, (name, k, decoder) in enumerate((("a", 3, "linear"), ("b", 5, "multilevel"))):
        torch.manual_seed(i + 1)
        seg = pm.create_segmentor(backbone, "spm", k, decoder)
        with torch.no_grad():
            for p in seg.method.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            refs[name] = seg.eval()(images)
        paths[name] = pm.save_prompts(seg, tmp_path / f"{name}.safetensors")
    bank = pm.PromptBank(backbone).eval()
    if move == "before_add":
        bank.to(CUDA)
    for name, path in paths.items():
        bank.add(name, path)
    if move == "after_add":
        bank.to(CUDA)
    assert on_cuda(bank)
    with torch.no_grad():
        for name in ("b", "a", "b"):
            out = bank(images.to(CUDA), name)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out.cpu(), refs[name], atol=1e-4, rtol=1e-4)
    maps = bank.predict(images.to(CUDA), "a")
    assert maps.device.type == "cuda" and maps.shape == (2, SIDE, SIDE)


# ----------------------------------------------------------------------------- checkpoints between GPU and CPU
@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu"])
def test_prompt_checkpoint_round_trip_between_gpu_and_cpu(tmp_path, direction, exact_fp32):
    """Prompts trained on one device load on the other (same backbone weights: the fingerprint
    must not depend on the device) and give the same logits."""
    src_dev, dst_dev = (CUDA, torch.device("cpu")) if direction == "gpu_to_cpu" else (torch.device("cpu"), CUDA)
    src = build("test_vit", seed=0).to(src_dev)
    images, labels = make_batch(SIDE, n=4, num_classes=K)
    amp = "bf16" if src_dev.type == "cuda" else None
    train_segmentor(src, images, labels, steps=2, batch=2, lr=1e-3, device=src_dev, amp=amp)
    src.eval()
    path = pm.save_prompts(src, tmp_path / "p.safetensors")
    assert pm.backbone_fingerprint(src) == pm.read_prompt_metadata(path)["backbone"]["fingerprint"]
    torch.manual_seed(0)
    dst = pm.create_segmentor("test_vit", "spm", K, "linear").to(dst_dev).eval()
    assert pm.backbone_fingerprint(dst) == pm.backbone_fingerprint(src), "the fingerprint depends on the device"
    pm.load_prompts(dst, path)
    with torch.no_grad():
        a = src(images.to(src_dev)).cpu()
        b = dst(images.to(dst_dev)).cpu()
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_merged_segmentor_round_trip_between_gpu_and_cpu(tmp_path, exact_fp32):
    model = build("test_resnet", "spm", "multilevel").to(CUDA)
    path = pm.save_segmentor(model, tmp_path / "m.safetensors")
    images = make_batch(SIDE, n=2)[0]
    with torch.no_grad():
        ref = model(images.to(CUDA)).cpu()
    for device in ("cpu", "cuda"):
        loaded = pm.load_segmentor(path, device=device)
        assert all(p.device.type == device for p in loaded.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded(images.to(device)).cpu(), ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- ONNX export
@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_onnx_export_of_a_cuda_model(tmp_path, backbone):
    """A model on the GPU exports, and its check against onnxruntime (CPU) passes at the default
    tolerance with TF32 left at torch's defaults; the model stays on the GPU."""
    pytest.importorskip("onnx", reason="onnx is not installed (pip install promptmatch[deploy])")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install promptmatch[deploy])")
    model = build(backbone).to(CUDA)
    report = pm.export_onnx(model, tmp_path / "m.onnx", (SIDE, SIDE))
    assert report.path.is_file() and report.max_abs_diff is not None and report.max_abs_diff <= 1e-3
    assert report.argmax_agreement >= 0.999
    assert on_cuda(model) and not model.training


# ----------------------------------------------------------------------------- benchmark engines
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_benchmark_real import write_folder

    return write_folder(tmp_path_factory.mktemp("data") / "mine")


def _spec(folder: Path, engine: str, **settings):
    base = {"image_size": SIDE, "steps": 3, "batch": 2, "warmup": 1, "eval_batch": 4, "latency_images": 2,
            "workers": 0, "engine": engine}
    return {"name": f"cuda-{engine}", "methods": ["linear", "spm"], "backbones": [{"name": "test_resnet"}],
            "datasets": [{"name": "mine", "folder": str(folder)}], "settings": {**base, **settings},
            "seeds": [0], "device": "cuda"}


def _check_cuda_record(rec):
    assert rec["status"] == "ok", rec.get("reason", "")[-3000:]
    assert rec["device"] == torch.cuda.get_device_name(0), rec["device"]
    assert rec["peak_mem_kind"] == "cuda max_memory_allocated" and rec["peak_mem_mb"] > 0
    for k in ("step_time_median_s", "latency_ms_median"):
        assert math.isfinite(rec[k]) and rec[k] > 0, (k, rec[k])
    assert all(0.0 <= v <= 1.0 for v in rec["miou"].values()), rec["miou"]
    assert math.isfinite(rec["loss_last"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_memory_engine_cells_on_cuda(folder, tmp_path, amp):
    spec = bm.validate_spec(_spec(folder, "memory", amp=amp))
    recs = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    assert [r["method"] for r in recs] == ["linear", "spm"]
    for rec in recs:
        _check_cuda_record(rec)


def test_memory_engine_cell_in_its_own_process_on_cuda(folder, tmp_path):
    """The command line's path: the cell in a child process, its peak the child's own."""
    spec = _spec(folder, "memory", amp="bf16")
    spec["methods"] = ["spm"]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert bm.main(["--spec", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    (rec,) = bm.ResultStore(tmp_path / "out" / "results.jsonl").load()
    _check_cuda_record(rec)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_runner_engine_cells_on_cuda(folder, tmp_path, amp):
    """The folder engine (runner) on a GPU, in both autocast precisions: it trains, evaluates and
    times on the GPU and its record says so."""
    spec = bm.validate_spec(_spec(folder, "runner", amp=amp))
    recs = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    assert [r["method"] for r in recs] == ["linear", "spm"]
    for rec in recs:
        _check_cuda_record(rec)
        assert rec["eval_precision"] == f"{amp} autocast"


def _logged_memory_mb(work_dir: Path):
    """The ``memory: N`` (MB, CUDA max allocated between log lines) values of mmengine's log."""
    text = "".join(p.read_text() for p in Path(work_dir).glob("*/*.log"))
    return [int(v) for v in re.findall(r"\bmemory: (\d+)", text)], text


def test_mmengine_engine_cells_on_cuda(folder, tmp_path):
    pytest.importorskip("mmseg", reason="the mmseg stack (mmcv, mmsegmentation) is not installed")
    spec = bm.validate_spec(_spec(folder, "mmengine", amp="bf16", eval_mode="slide", eval_crop=48, eval_stride=32))
    recs = bm.run_benchmark(spec, tmp_path / "out", progress=False, report=False, isolate=False)
    assert [r["method"] for r in recs] == ["linear", "spm"]
    for rec in recs:
        _check_cuda_record(rec)
        logged, text = _logged_memory_mb(rec["work_dir"])
        assert logged, "mmengine logged no GPU memory: " + text[-2000:]
        # mmengine resets the peak at every log line; the record's peak covers the whole training
        assert rec["peak_mem_mb"] + 1 >= max(logged), (rec["peak_mem_mb"], logged)


# ----------------------------------------------------------------------------- torchrun with NCCL
def _child_env(**extra):
    """This process's environment for a ``torchrun`` child: offline, promptmatch (and, for the
    test-only mmengine hook, this folder) importable whether installed or not."""
    paths = [str(REPO), str(Path(__file__).parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(paths), **extra)


def _torchrun(args, tmp_path, timeout=600):
    env = _child_env()
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           str(torch.cuda.device_count()), "--master_port", str(free_port()), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_benchmark_with_nccl_on_every_gpu(folder, tmp_path):
    """``torchrun`` over every GPU present (one process each, NCCL): memory cells on rank 0,
    mmengine cells (when the mmseg stack is installed) data-parallel over all of them."""
    pytest.importorskip("mmengine", reason="mmengine is not installed (the benchmark's NCCL set-up uses it)")
    have_mmseg = True
    try:
        import mmseg  # noqa: F401
    except ImportError:
        have_mmseg = False
    spec = _spec(folder, "memory")
    if have_mmseg:
        spec["settings"] = [spec["settings"], dict(spec["settings"], engine="mmengine")]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    proc = _torchrun(["-m", "promptmatch.benchmark", "--spec", str(path), "--out", str(out), "--no-progress",
                      "--launcher", "pytorch"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    recs = bm.ResultStore(out / "results.jsonl").load()
    assert len(recs) == (4 if have_mmseg else 2)
    n = torch.cuda.device_count()
    for rec in recs:
        _check_cuda_record(rec)
        assert rec["world_size"] == (n if rec["engine"] == "mmengine" else 1)
    if have_mmseg:
        logs = "".join(p.read_text() for p in (out / "cells").glob("*/*/*.log"))
        assert "Distributed training: True" in logs
        assert "promptmatch.PromptDistributedDataParallel" in logs and "(gloo)" not in logs


def test_dist_train_with_nccl_on_every_gpu(tmp_path):
    """``tools/dist_train.sh`` (torchrun + mmengine) on every GPU present: NCCL, one GPU per
    process, the same weights on every rank after training, one prompt checkpoint."""
    pytest.importorskip("mmseg", reason="the mmseg stack (mmcv, mmsegmentation) is not installed")
    from mmseg_utils import make_tiny_dataset, write_backbone_weights, write_configs

    n = torch.cuda.device_count()
    data = make_tiny_dataset(tmp_path / "data")
    cfg = write_configs(tmp_path, "upernet_r50", tmp_path / "backbone.pth", data)
    write_backbone_weights(cfg, tmp_path / "backbone.pth")
    sync = tmp_path / "sync"
    sync.mkdir()
    dist_cfg = tmp_path / "dist.py"
    dist_cfg.write_text(
        f"_base_ = ['./{cfg.name}']\n"
        "custom_imports = dict(imports=['dist_sync_hook'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='DistSyncCheckHook', out_dir='{sync}')]\n"
        "train_cfg = dict(max_iters=3, val_interval=3)\n"
        "default_hooks = dict(checkpoint=dict(interval=3))\n"
    )
    work = tmp_path / "work"
    env = _child_env(PYTHON=sys.executable, PORT=str(free_port()), MASTER_ADDR="127.0.0.1")
    proc = subprocess.run(["bash", str(REPO / "tools" / "dist_train.sh"), str(dist_cfg), str(n), "--work-dir",
                           str(work)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "(gloo)" not in log and "Distributed training: True" in log
    ranks = [json.loads((sync / f"rank{r}.json").read_text()) for r in range(n)]
    assert all(r["world_size"] == n for r in ranks)
    for r in ranks[1:]:
        assert r["checksums"] == pytest.approx(ranks[0]["checksums"], rel=0, abs=1e-6)
    assert (work / "prompts.safetensors").is_file()
