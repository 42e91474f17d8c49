"""The steps of :mod:`promptmatch.tools.gpu_smoke`: each takes the run (a ``SmokeRun``), returns ``(note,
metrics)``, raises :class:`~promptmatch.tools.gpu_smoke.SkipStep` when it cannot run here and
any other exception when it fails."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

Result = Tuple[str, Dict[str, Any]]

NO_MMSEG = ("the mmseg stack is not installed (mmcv with its ops, mmsegmentation): bash tools/setup_env.sh --all, "
            "or carry its wheels to the GPU machine (tools/gpu_check.sh --wheels DIR)")


#: classes of the synthetic data
K = 4


class SkipStep(Exception):
    """Raised by a step that cannot run here; its message is the reason."""


def package_root() -> Path:
    """The folder that holds the ``promptmatch`` package (a checkout's root: ``tools/`` is there)."""
    return Path(__file__).resolve().parents[2]


def _skip(reason: str) -> Exception:
    return SkipStep(reason)


def _have(*modules: str) -> Optional[str]:
    """The first of ``modules`` that cannot be imported, or ``None``."""
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return m
        except (ImportError, ValueError):
            return m
    return None


def _need_mmseg() -> None:
    missing = _have("mmengine", "mmcv", "mmseg")
    if missing is not None:
        raise _skip(f"{missing} missing: {NO_MMSEG}")
    try:
        import promptmatch.mmseg  # noqa: F401
    except ImportError as e:
        raise _skip(f"promptmatch.mmseg does not import ({e}): {NO_MMSEG}") from None


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 GPU results comparable with the CPU's (TF32 off for matmuls and convolutions)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _max_diff(a: Any, b: Any) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _tolerance(ref: Any) -> float:
    return 1e-3 * max(1.0, float(ref.abs().max()))


# ----------------------------------------------------------------------------- models
def train(run: Any, bb: str, method: str, amp: str) -> Result:
    """``steps`` training steps of ``method`` on backbone ``bb`` under ``amp`` autocast."""
    import promptmatch as pm

    if amp == "fp16" and run.device.type != "cuda":
        raise _skip("fp16 autocast needs CUDA (a CPU takes bf16 only)")
    try:
        model, rec = run.trained(bb, method, amp)
    except pm.MethodNotApplicableError as e:
        raise _skip(f"does not apply to {run.names[bb]}: {e}") from None
    if (method, amp) != ("spm", "bf16"):  # only the bf16 SPM models serve later steps
        run.forget(bb, method, amp)
    losses = rec["losses"]
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    step_ms = 1000 * statistics.median(rec["times"][1:] or rec["times"])
    metrics = {"step_ms_median": step_ms, "loss_first": losses[0], "loss_last": losses[-1],
               "skipped_steps": rec["skipped"], "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
               "peak_mb": rec["peak_mb"], "img_s": run.batch / (step_ms / 1000)}
    peak = f", peak {rec['peak_mb']:.0f} MB" if rec["peak_mb"] is not None else ""
    return f"step {step_ms:.0f} ms{peak}, loss {losses[0]:.3f} -> {losses[-1]:.3f}", metrics


def evaluate(run: Any, bb: str, mode: str) -> Result:
    """mIoU of the bf16-trained SPM model on the training images, whole or sliding-window, bf16."""
    from promptmatch.measure import sync
    from promptmatch.training import evaluate_segmentor

    model, _ = run.trained(bb, "spm", "bf16")
    x, y = run.data()
    crop = run.size // 2
    stride = crop if run.quick else crop // 2  # overlapping windows on the GPU, 4 windows in the shortened form
    kw = dict(crop=crop, stride=stride) if mode == "slide" else {}
    evaluate_segmentor(model, x[:1], y[:1], K, batch=1, device=run.device, mode=mode, amp="bf16", **kw)  # warm-up
    sync(run.device)
    t0 = time.perf_counter()
    miou, _, preds = evaluate_segmentor(model, x, y.to(run.device), K, batch=4, device=run.device, mode=mode,
                                        amp="bf16", **kw)
    sync(run.device)
    dt = time.perf_counter() - t0
    if tuple(preds.shape) != tuple(y.shape) or not 0.0 <= miou <= 1.0:
        raise RuntimeError(f"predictions {tuple(preds.shape)} for labels {tuple(y.shape)}, mIoU {miou}")
    extra = f" (crop {crop}, stride {stride})" if mode == "slide" else ""
    return f"mIoU {miou:.3f}, {len(x) / dt:.1f} img/s{extra}", {"miou": miou, "img_s": len(x) / dt}


def predict(run: Any, bb: str) -> Result:
    """:func:`promptmatch.predict` on uint8 images of odd sizes (whole, slide, bf16) and on a
    batch already on the device."""
    import numpy as np
    import torch

    import promptmatch as pm

    model, _ = run.trained(bb, "spm", "bf16")
    rng = np.random.default_rng(0)
    s = run.size
    sizes = [(s - 10, s + 6), (s // 2 + 3, s - 1), (s, s)]
    raw = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    whole = pm.predict(model, raw, batch=2, amp="bf16", progress=False)
    slide = pm.predict(model, raw, mode="slide", crop=s // 2, stride=s // 4, amp="bf16", progress=False)
    for maps in (whole, slide):
        got = [tuple(m.shape) for m in maps]
        if got != sizes or any(m.device.type != "cpu" for m in maps):
            raise RuntimeError(f"class maps of sizes {got} for images {sizes}")
    x = run.data()[0][:2].to(run.device)
    on_device = pm.predict(model, x)
    if on_device.device.type != run.device.type or tuple(on_device.shape) != (2, s, s):
        raise RuntimeError(f"a {run.device.type} batch gave maps {tuple(on_device.shape)} on {on_device.device}")
    agree = float((whole[2].to(run.device) == pm.predict(model, torch.from_numpy(raw[2]).permute(2, 0, 1),
                                                          amp="bf16", progress=False).to(run.device)).float().mean())
    return f"3 odd-sized images, whole + slide, bf16; same image twice agrees {agree:.3f}", {"agreement": agree}


def onnx(run: Any, bb: str) -> Result:
    """ONNX export of the SPM model from the device, checked against onnxruntime (CPU)."""
    import promptmatch as pm

    missing = _have("onnx", "onnxruntime")
    if missing is not None:
        raise _skip(f"{missing} is not installed (pip install promptmatch[deploy])")
    model, _ = run.trained(bb, "spm", "bf16")
    report = pm.export_onnx(model, run.work / f"{bb}.onnx", (run.size, run.size))
    dev = next(model.parameters()).device.type
    if dev != run.device.type:
        raise RuntimeError(f"export left the model on {dev}")
    return (f"max |diff| {report.max_abs_diff:.2e}, argmax agreement {report.argmax_agreement:.4f}, "
            f"{report.file_bytes / 2**20:.1f} MB"), {"max_abs_diff": report.max_abs_diff,
                                                     "argmax_agreement": report.argmax_agreement,
                                                     "file_bytes": report.file_bytes}


def bank(run: Any) -> Result:
    """Two datasets' prompts (SPM: linear head on 4 classes, multi-level head on 3) on one shared
    backbone on the device; each gives its own segmentor's logits."""
    import torch

    import promptmatch as pm
    from promptmatch.training import train_segmentor

    a, _ = run.trained("vit", "spm", "bf16")
    torch.manual_seed(0)
    b = pm.create_segmentor(run.names["vit"], "spm", 3, "multilevel", weights=run.weights).to(run.device)
    x, y = run.data()
    train_segmentor(b, x, y % 3, run.steps, run.batch, 1e-4, device=run.device, amp="bf16")
    b.eval()
    paths = {n: pm.save_prompts(m, run.work / f"bank_{n}.safetensors") for n, m in (("a", a), ("b", b))}
    torch.manual_seed(0)
    backbone = pm.create_backbone(run.names["vit"], weights=run.weights)
    prompt_bank = pm.PromptBank(backbone).to(run.device).eval()
    for n, p in paths.items():
        prompt_bank.add(n, p)
    worst = 0.0
    with torch.no_grad():
        for n, m in (("b", b), ("a", a), ("b", b)):
            ref, got = m(x[:1].to(run.device)), prompt_bank(x[:1].to(run.device), n)
            worst = max(worst, _max_diff(got, ref))
            if worst > _tolerance(ref):
                raise RuntimeError(f"dataset {n!r}: the bank's logits differ from its segmentor's by {worst:.2e}")
    return f"2 datasets on one backbone, max |diff| {worst:.1e}", {"max_abs_diff": worst}


def save_load(run: Any) -> Result:
    """Prompts saved from the device load onto a CPU model; a merged file loads on both."""
    import torch

    import promptmatch as pm

    model, _ = run.trained("vit", "spm", "bf16")
    x = run.data()[0][:1]
    path = pm.save_prompts(model, run.work / "prompts.safetensors")
    torch.manual_seed(0)
    cpu = pm.create_segmentor(run.names["vit"], "spm", K, "linear", weights=run.weights).eval()
    pm.load_prompts(cpu, path)
    merged = pm.save_segmentor(model, run.work / "merged.safetensors")
    diffs = {}
    with torch.no_grad(), _no_tf32():
        ref = model(x.to(run.device))
        diffs["prompts_to_cpu"] = _max_diff(cpu(x), ref)
        for dev in sorted({"cpu", run.device.type}):
            diffs[f"merged_on_{dev}"] = _max_diff(pm.load_segmentor(merged, device=dev)(x.to(dev)), ref)
    bad = {k: v for k, v in diffs.items() if v > _tolerance(ref)}
    if bad:
        raise RuntimeError(f"logits after loading differ from the saved model's: {bad}")
    kb = path.stat().st_size / 1024
    return (f"prompts {kb:.0f} KB, merged {merged.stat().st_size / 2**20:.0f} MB; max |diff| "
            f"{max(diffs.values()):.1e}"), dict(diffs, prompt_kb=kb)


# ----------------------------------------------------------------------------- benchmark and torchrun
def _logged_memory_mb(work_dir: Path) -> List[int]:
    """The ``memory: N`` figures (MB, CUDA max allocated since the last log line) of mmengine's logs."""
    text = "".join(p.read_text(errors="replace") for p in Path(work_dir).glob("*/*.log"))
    return [int(v) for v in re.findall(r"\bmemory: (\d+)", text)]


def _check_records(recs: List[Dict[str, Any]], want: int) -> None:
    bad = [f"{r['method']}/{r.get('engine')}: {r['status']}: {str(r.get('reason', ''))[-1500:]}" for r in recs
           if r["status"] != "ok"]
    if bad or len(recs) != want:
        raise RuntimeError(f"{len(recs)} of {want} cells recorded; not ok: " + " | ".join(bad))


def bench(run: Any, engine: str) -> Result:
    """The trimmed spec of one engine, in this process; the mmengine cells' GPU peak against
    the largest figure of mmengine's own log."""
    from promptmatch import benchmark as bm

    if engine == "mmengine":
        _need_mmseg()
    spec = bm.validate_spec(run.spec(engine))
    recs = bm.run_benchmark(spec, run.work / f"bench_{engine}", progress=False, report=True, isolate=False)
    _check_records(recs, len(bm.expand_grid(spec)))
    metrics: Dict[str, Any] = {}
    notes = []
    for r in recs:
        m = {k: r.get(k) for k in ("step_time_median_s", "peak_mem_mb", "peak_mem_kind", "latency_ms_median", "miou")}
        if engine == "mmengine" and run.device.type == "cuda":
            logged = _logged_memory_mb(Path(r["work_dir"]))
            m["mmengine_log_max_mb"] = max(logged) if logged else None
            if not logged:
                raise RuntimeError(f"{r['method']}: mmengine logged no GPU memory under {r['work_dir']}")
            if r["peak_mem_mb"] + 1 < max(logged):
                raise RuntimeError(f"{r['method']}: the record's GPU peak {r['peak_mem_mb']:.0f} MB is below "
                                   f"mmengine's own log ({max(logged)} MB): part of training's memory is missed")
            notes.append(f"{r['method']} peak {r['peak_mem_mb']:.0f} MB (log {max(logged)})")
        else:
            notes.append(f"{r['method']} {1000 * r['step_time_median_s']:.0f} ms/step")
        metrics[r["method"]] = m
    return f"{len(recs)} cells ok; " + ", ".join(notes), metrics


def torchrun_bench(run: Any) -> Result:
    """``torchrun --nproc_per_node 1 -m promptmatch.benchmark --launcher pytorch``: SPM on both
    engines (the memory engine alone without the mmseg stack, and in the shortened form)."""
    from promptmatch import benchmark as bm

    spec = run.spec("memory", ("spm",))
    engines = ["memory"]
    if not run.quick:  # the shortened form leaves mmengine under torchrun to torchrun/train
        try:
            _need_mmseg()
            engines.append("mmengine")
        except Exception:  # noqa: BLE001  (the memory engine alone is still a torchrun run)
            pass
    spec["settings"] = [dict(spec["settings"], engine=e) for e in engines]
    path = run.work / "torchrun_spec.json"
    path.write_text(json.dumps(spec))
    out = run.work / "torchrun_bench"
    run.torchrun(["-m", "promptmatch.benchmark", "--spec", str(path), "--out", str(out), "--no-progress",
                  "--launcher", "pytorch"], "torchrun_bench")
    recs = bm.ResultStore(out / "results.jsonl").load()
    _check_records(recs, len(engines))
    devices = sorted({str(r.get("device")) for r in recs})
    note = f"engines {'+'.join(engines)}, {len(recs)} cells ok on {', '.join(devices)}"
    if "mmengine" not in engines and not run.quick:
        note += " (no mmseg stack: mmengine engine not run)"
    return note, {"engines": engines, "world_size": [r.get("world_size") for r in recs]}


def torchrun_train(run: Any) -> Result:
    """``torchrun --nproc_per_node 1 tools/train.py CONFIG --launcher pytorch`` on the config
    the benchmark builds for an SPM cell of the mmengine engine; its prompt checkpoint is read."""
    _need_mmseg()
    import promptmatch as pm
    from promptmatch import benchmark as bm
    from promptmatch.benchmark.mmseg_cell import build_cell_config

    (cell,) = bm.expand_grid(bm.validate_spec(run.spec("mmengine", ("spm",))))
    work = run.work / "torchrun_train"
    cfg = build_cell_config(cell, work, 1e-4)
    work.mkdir(parents=True, exist_ok=True)
    cfg.dump(str(run.work / "train_config.py"))
    script = package_root() / "tools" / "train.py"
    entry = [str(script)] if script.is_file() else ["-m", "promptmatch.mmseg.cli.train"]
    run.torchrun(entry + [str(run.work / "train_config.py"), "--launcher", "pytorch", "--work-dir", str(work)],
                 "torchrun_train")
    meta = pm.read_prompt_metadata(work / "prompts.safetensors")
    if meta["method"] != "spm":
        raise RuntimeError(f"the prompt checkpoint is of method {meta['method']!r}, not 'spm'")
    return f"{cell.settings['steps']} iterations, prompts written ({cell.backbone['name']})", {}
