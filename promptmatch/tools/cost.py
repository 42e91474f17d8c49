"""Side-by-side cost of tuning methods: inference, training step, peak memory, trainable params.

For every (decoder, variant) and the references ``linear`` (frozen backbone + head), ``full``
(full fine-tuning) and ``lora`` (when peft is importable), measure:

* inference: median ms of a no-grad, eval-mode forward of a batch, over interleaved rounds
  (one forward of each model per round, as tools/latency.py does), and its ratio to ``linear``;
* training step: median ms of forward + summed ``model.loss`` + backward + AdamW step over
  interleaved rounds, and its ratios to ``full`` and ``lora``;
* peak training memory, each model in a fresh child process (:func:`memory_child` through
  :func:`promptmatch.measure.call_in_child`): CPU: peak RSS after ``--mem-steps`` steps minus
  the RSS right after building the model and its optimiser (the peak is ``VmHWM``, reset to
  the current RSS at that point where /proc/self/clear_refs allows: ``ru_maxrss`` of a child
  starts at its parent's RSS);
  CUDA: ``max_memory_allocated`` minus the allocation at that point;
* ``train_state_mb``, a deterministic figure: bytes of the activations saved for backward in
  one training step (``saved_tensors_hooks``, distinct storages, parameters and buffers of the
  model left out since they are resident anyway) + gradient bytes + AdamW state
  (2 x trainable parameter bytes);
* the number of trainable parameters.

Prints one markdown table per decoder and writes every figure to ``--out``.

    .venv/bin/python tools/cost.py --backbone resnet50 --size 256 --batch 2 --decoder linear \\
        --variant spm --variant 'late=spm:{"prompt_boundaries": [-2, -1], "backprop_backbone": true}' --out work_dirs/cost.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import logging
import math
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from promptmatch.measure import (MB, call_in_child, cuda_allocated_bytes, cuda_peak_bytes, high_water_rss_bytes,
                                 reset_cuda_peak, reset_high_water_rss, rss_bytes, sync, time_interleaved)

from ._common import resolve_weights, split_variant, write_result

__all__ = ["main", "parse_variant", "memory_child", "markdown_table", "REFERENCES"]

_logger = logging.getLogger("cost")

#: the reference rows, always measured: (label, method)
REFERENCES = (("linear", "linear"), ("full", "full"), ("lora", "lora"))


# ----------------------------------------------------------------------------- parsing
def parse_variant(text: str) -> Tuple[str, Optional[dict], str]:
    """``method``, ``method:JSON`` or ``label=method:JSON`` -> (method, method_cfg, label);
    without a label the label is the text itself."""
    head, sep, rest = text.partition("=")
    if sep and head and not any(c in head for c in ':{"'):
        name, cfg, _ = split_variant(rest)
        return name, cfg, head
    return split_variant(text)


# ----------------------------------------------------------------------------- building / stepping
def build(spec: Dict[str, Any]):
    """A segmentor as tools/latency.py builds it, seeded so that every method starts from the
    same random backbone when ``--weights none``."""
    import torch

    import promptmatch as pm

    torch.manual_seed(spec.get("seed", 0))
    return pm.create_segmentor(spec["backbone"], spec["method"], spec["classes"], spec["decoder"],
                               method_cfg=spec["method_cfg"], weights=spec["weights"],
                               weights_remap=spec["weights_remap"], backbone_kwargs=spec["backbone_kwargs"] or None)


def make_optimizer(model):
    import torch

    return torch.optim.AdamW(model.param_groups(lr=1e-4, weight_decay=0.01))


def autocast(device, amp: Optional[str]):
    import torch

    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, opt, images, labels, device, amp: Optional[str]) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss = sum(model.loss(images, labels).values())
    loss.backward()
    opt.step()


def trainable_count(model) -> int:
    import promptmatch as pm

    return pm.parameter_report(model).trainable


# ----------------------------------------------------------------------------- memory child
def saved_activation_bytes(model, opt, images, labels, device, amp) -> int:
    """Bytes of the distinct storages saved for backward during one training step, the model's
    own parameters and buffers left out (resident whether or not it trains)."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in own:
                seen.setdefault(ptr, st.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, opt, images, labels, device, amp)
    return sum(seen.values())


def memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Build one model in this (fresh) process, run ``mem_steps`` training steps, report the peak
    memory over the baseline right after building, and the deterministic train-state bytes."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = build(spec).to(device).train()
    opt = make_optimizer(model)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=g).to(device)
    labels = torch.randint(0, spec["classes"], (spec["batch"], spec["size"], spec["size"]), generator=g).to(device)
    out: Dict[str, Any] = {}
    if device.type == "cuda":
        sync(device)
        reset_cuda_peak(device)
        base = cuda_allocated_bytes(device)
        for _ in range(spec["mem_steps"]):
            train_step(model, opt, images, labels, device, spec["amp"])
        sync(device)
        peak = cuda_peak_bytes(device)
        out.update(peak_mb=(peak - base) / MB, peak_kind="cuda max_memory_allocated - allocated after build",
                   baseline_mb=base / MB, peak_abs_mb=peak / MB)
    else:
        # the peak is VmHWM reset to the RSS after the build where /proc/self/clear_refs allows:
        # ru_maxrss of a child also holds its parent's RSS at the fork before exec
        base = rss_bytes() / MB
        reset = reset_high_water_rss()
        for _ in range(spec["mem_steps"]):
            train_step(model, opt, images, labels, device, spec["amp"])
        peak_bytes, kind = high_water_rss_bytes()
        peak = peak_bytes / MB
        out.update(peak_mb=peak - base, baseline_mb=base, peak_abs_mb=peak,
                   peak_kind=f"cpu peak RSS ({kind}{', reset after build' if reset else ''}) after steps "
                             f"- RSS after build")
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    saved = saved_activation_bytes(model, opt, images, labels, device, spec["amp"])
    out.update(saved_tensors_mb=saved / MB, grad_mb=param_bytes / MB, optimizer_state_mb=2 * param_bytes / MB,
               train_state_mb=(saved + 3 * param_bytes) / MB)
    return out


def run_memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`memory_child` in a fresh Python process."""
    res = call_in_child("promptmatch.tools.cost:memory_child", spec)
    if not res.ok:
        raise RuntimeError(f"memory child for {spec['label']!r} ({spec['decoder']}) failed with exit code "
                           f"{res.returncode}:\n{res.stderr[-3000:]}")
    return res.value


# ----------------------------------------------------------------------------- timing
def interleaved(fns: Dict[Any, Any], rounds: int, warmup: int, device, what: str) -> Dict[Any, float]:
    """Median seconds of each callable over ``rounds`` interleaved rounds after ``warmup``."""
    from tqdm import tqdm

    def progress(rounds_iter):
        return tqdm(rounds_iter, desc=what, unit="round", file=sys.stderr)

    times = time_interleaved(fns, rounds, warmup, device, progress=progress)
    return {k: t.median for k, t in times.items()}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


# ----------------------------------------------------------------------------- report
def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(rows: List[Dict[str, Any]], decoder: str) -> str:
    head = ["variant", "trainable", "inference ms", "/frozen", "step ms", "/full", "/lora", "peak MB", "/full",
            "/lora", "train-state MB", "/full", "/lora"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        if r["decoder"] != decoder:
            continue
        cells = [r["label"], f"{r['trainable_params']:,}", _fmt(r["inference_ms_median"], ".2f"),
                 _fmt(r["inference_ratio_to_frozen"], ".2f"), _fmt(r["step_ms_median"], ".2f"),
                 _fmt(r["step_ratio_to_full"], ".2f"), _fmt(r["step_ratio_to_lora"], ".2f"),
                 _fmt(r["peak_mb"], ".1f"), _fmt(r["peak_ratio_to_full"], ".2f"), _fmt(r["peak_ratio_to_lora"], ".2f"),
                 _fmt(r["train_state_mb"], ".1f"), _fmt(r["train_state_ratio_to_full"], ".2f"),
                 _fmt(r["train_state_ratio_to_lora"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build, measure and report; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50", help="timm model name")
    ap.add_argument("--weights", default="none",
                    help="packaged weights name (promptmatch.list_offline_weights()), a local file, or 'none' "
                         "(random init, the default)")
    ap.add_argument("--size", type=int, default=512, help="square input side in pixels")
    ap.add_argument("--batch", type=int, default=2, help="images per forward / training step")
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--decoder", action="append", help="decoder(s), repeatable (default: linear)")
    ap.add_argument("--variant", action="append",
                    help="method, method:JSON-config or label=method:JSON-config; repeatable (default: spm). "
                         "linear, full and lora are always measured as references")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=3, help="training steps of each memory child")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", choices=["bf16"], help="autocast forward and loss to this dtype")
    ap.add_argument("--backbone-kwargs", default="{}", help="JSON keyword arguments of the timm model")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for flag in ("size", "batch", "classes", "rounds", "mem_steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")

    import timm
    import torch

    import promptmatch as pm

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available to this torch build / machine")
    device = torch.device(args.device)
    try:
        variants = [parse_variant(v) for v in (args.variant or ["spm"])]
        bkw = json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as e:
        ap.error(f"invalid JSON in --variant or --backbone-kwargs: {e}")
    for name, _, label in variants:
        if name not in pm.list_methods():
            ap.error(f"unknown method {name!r} in --variant {label!r}; available methods: {list(pm.list_methods())}")
    labels_seen = [label for _, _, label in variants]
    for label in labels_seen:
        if labels_seen.count(label) > 1 or label in dict(REFERENCES):
            ap.error(f"variant label {label!r} is used twice (linear, full and lora are always measured); "
                     f"name it: --variant 'mylabel=method:JSON'")
    if args.threads:
        torch.set_num_threads(args.threads)
    weights, remap = resolve_weights(args.weights)
    decoders = args.decoder or ["linear"]
    try:
        importlib.import_module("peft")
        refs = list(REFERENCES)
    except ImportError:
        _logger.warning("peft is not importable: the 'lora' reference is left out")
        refs = [r for r in REFERENCES if r[0] != "lora"]

    base_spec = dict(backbone=args.backbone, weights=weights, weights_remap=remap, backbone_kwargs=bkw,
                     classes=args.classes, size=args.size, batch=args.batch, mem_steps=args.mem_steps,
                     threads=args.threads, device=args.device, amp=args.amp, seed=0)
    specs: Dict[Tuple[str, str], Dict[str, Any]] = {}
    models: Dict[Tuple[str, str], Any] = {}
    skipped: List[Dict[str, str]] = []
    for dec in decoders:
        for label, name, cfg, is_ref in ([(lab, m, None, True) for lab, m in refs]
                                         + [(lab, m, c, False) for m, c, lab in variants]):
            spec = dict(base_spec, decoder=dec, method=name, method_cfg=cfg, label=label, reference=is_ref)
            _logger.info("building %s / %s", dec, label)
            try:
                model = build(spec).to(device)
            except pm.MethodNotApplicableError as e:
                _logger.warning("skipping %s on %s: %s", label, args.backbone, e)
                skipped.append({"decoder": dec, "label": label, "reason": f"{type(e).__name__}: {e}"})
                continue
            except (ValueError, TypeError) as e:
                if is_ref:
                    raise
                ap.error(f"--variant {label!r}: {e}")
            specs[(dec, label)], models[(dec, label)] = spec, model

    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=g).to(device)

    # 1. inference
    for m in models.values():
        m.eval()

    def infer(m):
        def fn():
            with torch.no_grad(), autocast(device, args.amp):
                m(images)
        return fn

    inf = interleaved({k: infer(m) for k, m in models.items()}, args.rounds, args.warmup, device, "inference")

    # 2. training step
    opts = {k: make_optimizer(m.train()) for k, m in models.items()}

    def step(k):
        return lambda: train_step(models[k], opts[k], images, labels, device, args.amp)

    stp = interleaved({k: step(k) for k in models}, args.rounds, args.warmup, device, "training step")
    trainable = {k: trainable_count(m) for k, m in models.items()}
    models.clear()  # free them before the memory children run
    opts.clear()

    # 3. memory, one fresh child process per model
    mem: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for k, spec in specs.items():
        _logger.info("memory child: %s / %s", *k)
        mem[k] = run_memory_child(spec)

    rows: List[Dict[str, Any]] = []
    for (dec, label), spec in specs.items():
        def ref(table, what):
            return table.get((dec, what))

        def mref(what, field):
            return (mem.get((dec, what)) or {}).get(field)

        k = (dec, label)
        m = mem[k]
        rows.append({
            "decoder": dec, "label": label, "method": spec["method"], "method_cfg": spec["method_cfg"],
            "reference": spec["reference"], "trainable_params": trainable[k],
            "inference_ms_median": 1000 * inf[k], "inference_ratio_to_frozen": _ratio(inf[k], ref(inf, "linear")),
            "step_ms_median": 1000 * stp[k], "step_ratio_to_full": _ratio(stp[k], ref(stp, "full")),
            "step_ratio_to_lora": _ratio(stp[k], ref(stp, "lora")),
            **m,
            "peak_ratio_to_full": _ratio(m["peak_mb"], mref("full", "peak_mb")),
            "peak_ratio_to_lora": _ratio(m["peak_mb"], mref("lora", "peak_mb")),
            "train_state_ratio_to_full": _ratio(m["train_state_mb"], mref("full", "train_state_mb")),
            "train_state_ratio_to_lora": _ratio(m["train_state_mb"], mref("lora", "train_state_mb")),
        })
    for dec in decoders:
        print(f"\n### {args.backbone}, decoder {dec}, {args.batch} x {args.size}px, {args.device}"
              f"{', ' + args.amp if args.amp else ''}, {torch.get_num_threads()} threads\n")
        print(markdown_table(rows, dec))
    if skipped:
        print("\nskipped: " + "; ".join(f"{s['decoder']}/{s['label']}: {s['reason']}" for s in skipped))
    bad = [r["label"] for r in rows if not all(math.isfinite(r[f]) and r[f] > 0
                                                 for f in ("inference_ms_median", "step_ms_median"))]
    if bad:
        _logger.warning("non-positive or non-finite times for %s", bad)
    result = {
        "command": shlex.join([sys.executable, os.path.abspath(sys.argv[0])] + argv), "argv": argv,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "backbone": args.backbone, "weights": args.weights, "size": args.size, "batch": args.batch,
        "classes": args.classes, "rounds": args.rounds, "warmup": args.warmup, "mem_steps": args.mem_steps,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": args.amp, "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
        "promptmatch": pm.__version__, "decoders": decoders, "rows": rows, "skipped": skipped,
    }
    if args.out:
        write_result(args.out, result)
    return 0
