"""Serving several datasets from one frozen backbone (PromptBank) versus one full model per dataset.

For each number of datasets, prompt sets are made by random-initialising a segmentor per
dataset on one shared (randomly initialised, never downloaded) backbone and saving its
prompts (``save_prompts``) and the whole model (``save_segmentor``). Then a stream of
requests (one image and a dataset id each, round-robin or random) is served

* by a :class:`promptmatch.PromptBank`: the backbone loaded once, each dataset's prompts
  added from its prompt checkpoint, the dataset chosen per request (``bank(image, name)``);
* by one model per dataset kept in memory, each rebuilt from its merged file
  (``load_segmentor``), the model chosen per request.

Reported per configuration: requests/second (median over repeats), the setup (load) time,
the resident memory the loaded models add (RSS delta) and the bytes of their distinct
parameters and buffers. By default every configuration runs in a fresh Python process so
that RSS deltas do not inherit memory from another configuration.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bank_serving.py --backbone resnet50 --size 224 \\
        --requests 32 --datasets 1 4 16 --out work_dirs/bank_serving.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from promptmatch.measure import call_in_child, rss_bytes, time_call

__all__ = ["main", "run_config", "run_isolated", "request_stream", "tensor_bytes", "markdown_table", "MODES"]

_logger = logging.getLogger("bank_serving")

MODES = ("bank", "per_model")


# ----------------------------------------------------------------------------- measuring
def tensor_bytes(modules: Sequence[Any]) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` (shared tensors counted once)."""
    seen = set()
    total = 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if t.numel() == 0 or key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def request_stream(num_datasets: int, num_requests: int, order: str, seed: int) -> List[int]:
    """Dataset index of each request: round-robin (``rr``) or uniformly random (``random``)."""
    if order == "rr":
        return [i % num_datasets for i in range(num_requests)]
    if order == "random":
        rng = random.Random(seed)
        return [rng.randrange(num_datasets) for _ in range(num_requests)]
    raise ValueError(f"order must be 'rr' or 'random', got {order!r}")


def dataset_name(i: int) -> str:
    return f"ds{i:02d}"


# ----------------------------------------------------------------------------- artefacts
def make_artefacts(workdir: Path, args: argparse.Namespace, count: int) -> Dict[str, Any]:
    """Write the shared backbone's weights, and for ``count`` datasets a prompt checkpoint and a
    merged segmentor file each (prompts randomly initialised, seed = dataset index)."""
    import torch
    from safetensors.torch import save_file

    import promptmatch as pm
    from promptmatch.merged import save_segmentor

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    bkw = json.loads(args.backbone_kwargs)
    torch.manual_seed(args.seed)
    backbone = pm.create_backbone(args.backbone, pretrained=False, **bkw)
    backbone_file = workdir / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(backbone_file))
    method_cfg = json.loads(args.method_config) if args.method_config else None
    prompts, merged = [], []
    for i in range(count):
        torch.manual_seed(args.seed + 1 + i)
        seg = pm.PromptSegmentor(backbone, args.classes, method=args.method, method_cfg=method_cfg,
                                 decoder=args.decoder, class_names=[f"c{k}" for k in range(args.classes)])
        seg.eval()
        p = workdir / f"{dataset_name(i)}.prompts.safetensors"
        pm.save_prompts(seg, p, extra={"dataset": dataset_name(i)})
        m = workdir / f"{dataset_name(i)}.merged.safetensors"
        # rebuilding once proves the record; the other datasets share backbone and config
        save_segmentor(seg, m, backbone_kwargs=bkw, verify=(i == 0), write_json=False,
                       extra={"dataset": dataset_name(i)})
        prompts.append(str(p))
        merged.append(str(m))
    _logger.info("wrote artefacts of %d datasets to %s in %.1fs", count, workdir, time.perf_counter() - t0)
    return {"backbone_file": str(backbone_file), "prompts": prompts, "merged": merged,
            "prompt_file_mb": os.path.getsize(prompts[0]) / 2**20,
            "merged_file_mb": os.path.getsize(merged[0]) / 2**20,
            "setup_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- one configuration
def _preload(cfg: Dict[str, Any]) -> None:
    """Import and initialise what loading needs (timm alone is ~190 MB of RSS), so that the
    RSS delta measures the models, not the libraries."""
    import timm  # noqa: F401
    import torch
    from safetensors.torch import load_file  # noqa: F401

    if cfg.get("method") == "lora":
        import peft  # noqa: F401
    with torch.no_grad():
        torch.nn.Conv2d(3, 4, 3)(torch.zeros(1, 3, 16, 16))


def run_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Load ``cfg["datasets"]`` datasets in mode ``cfg["mode"]``, serve the request stream
    ``cfg["repeats"]`` times and return the measurements."""
    import gc

    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    import promptmatch as pm
    from promptmatch.merged import load_segmentor

    n, mode = int(cfg["datasets"]), cfg["mode"]
    names = [dataset_name(i) for i in range(n)]
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    side = int(cfg["size"])
    images = [torch.randn(1, 3, side, side, generator=g) for _ in range(int(cfg["image_pool"]))]
    stream = request_stream(n, int(cfg["requests"]), cfg["order"], int(cfg["seed"]))
    _preload(cfg)
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    if mode == "bank":
        from safetensors.torch import load_file

        backbone = pm.create_backbone(cfg["backbone"], pretrained=False, **cfg["backbone_kwargs"])
        backbone.load_state_dict(load_file(cfg["backbone_file"]), strict=True)
        bank = pm.PromptBank(backbone)
        for name, path in zip(names, cfg["prompts"]):
            bank.add(name, path)
        bank.eval()
        holders = [bank]

        def serve(img: torch.Tensor, ds: int) -> torch.Tensor:
            return bank(img, names[ds])
    elif mode == "per_model":
        models = [load_segmentor(p) for p in cfg["merged"][:n]]
        holders = models

        def serve(img: torch.Tensor, ds: int) -> torch.Tensor:
            return models[ds](img)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    setup_s = time.perf_counter() - t0
    gc.collect()
    rss_loaded = rss_bytes()
    param_bytes = tensor_bytes(holders)

    probe = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(12345))
    digests = []
    rps, per_req = [], []
    with torch.no_grad():
        for ds in range(n):  # warm-up: every dataset once, and a digest of its prediction
            out = serve(probe, ds)
            digests.append(hashlib.sha256(out.argmax(1).to(torch.int32).numpy().tobytes()).hexdigest()[:16])
        for i in range(int(cfg["warmup"])):
            serve(images[i % len(images)], stream[i % len(stream)])
        def serve_stream() -> None:
            for i, ds in enumerate(stream):
                serve(images[i % len(images)], ds)

        for dt in time_call(serve_stream, int(cfg["repeats"])).samples:
            rps.append(len(stream) / dt)
            per_req.append(1000.0 * dt / len(stream))
    rss_served = rss_bytes()
    return {
        "mode": mode,
        "datasets": n,
        "requests": len(stream),
        "repeats": len(rps),
        "requests_per_s": statistics.median(rps),
        "requests_per_s_all": rps,
        "ms_per_request": statistics.median(per_req),
        "setup_s": setup_s,
        "rss_delta_mb": (rss_loaded - rss0) / 2**20,
        "rss_delta_after_serving_mb": (rss_served - rss0) / 2**20,
        "param_mb": param_bytes / 2**20,
        "prediction_digests": digests,
        "threads": torch.get_num_threads(),
    }


def run_isolated(cfg: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
    """:func:`run_config` in a fresh Python process (clean RSS)."""
    res = call_in_child("promptmatch.tools.bank_serving:run_config", cfg, timeout=timeout)
    if not res.ok:
        rc = "timeout" if res.timed_out else res.returncode
        raise RuntimeError(f"worker for {cfg['mode']} x {cfg['datasets']} failed (exit {rc}):\n"
                           f"{res.stderr[-4000:]}")
    return res.value


# ----------------------------------------------------------------------------- report
def markdown_table(results: List[Dict[str, Any]]) -> str:
    """One row per number of datasets, the bank and one-model-per-dataset side by side."""
    by = {(r["datasets"], r["mode"]): r for r in results}
    counts = sorted({r["datasets"] for r in results})
    head = ("| datasets | bank req/s | per-model req/s | bank RSS Δ MB | per-model RSS Δ MB | bank param MB "
            "| per-model param MB | bank load s | per-model load s | same predictions |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cell(r: Optional[Dict[str, Any]], key: str, fmt: str) -> str:
        return format(r[key], fmt) if r is not None else "-"

    for n in counts:
        b, m = by.get((n, "bank")), by.get((n, "per_model"))
        same = "-" if b is None or m is None else ("yes" if b["prediction_digests"] == m["prediction_digests"] else "NO")
        lines.append(
            f"| {n} | {cell(b, 'requests_per_s', '.2f')} | {cell(m, 'requests_per_s', '.2f')} "
            f"| {cell(b, 'rss_delta_mb', '.0f')} | {cell(m, 'rss_delta_mb', '.0f')} "
            f"| {cell(b, 'param_mb', '.1f')} | {cell(m, 'param_mb', '.1f')} "
            f"| {cell(b, 'setup_s', '.1f')} | {cell(m, 'setup_s', '.1f')} | {same} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50", help="timm model name (random init, never downloaded)")
    ap.add_argument("--backbone-kwargs", default="{}", help="JSON keyword arguments of the timm model")
    ap.add_argument("--method", default="spm", help="tuning method of every dataset's prompts")
    ap.add_argument("--method-config", default="", help="JSON config of the method")
    ap.add_argument("--decoder", default="linear")
    ap.add_argument("--classes", type=int, default=150, help="classes per dataset")
    ap.add_argument("--size", type=int, default=224, help="square image side of each request")
    ap.add_argument("--requests", type=int, default=32, help="requests per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests before timing (after one per dataset)")
    ap.add_argument("--datasets", type=int, nargs="+", default=[1, 4, 16], help="numbers of datasets to serve")
    ap.add_argument("--order", choices=("rr", "random"), default="rr", help="dataset of each request")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--image-pool", type=int, default=4, help="distinct request images, reused in turn")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where to write the artefacts (default: a temporary directory, removed)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="run every configuration in this process (faster; RSS deltas then less clean)")
    ap.add_argument("--out", help="write the results to this JSON file")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the artefacts, serve every configuration and report; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    counts = sorted(set(args.datasets))
    if counts[0] < 1:
        raise SystemExit("--datasets must be positive")
    t_start = time.perf_counter()
    tmp = None
    workdir = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="bank_serving_"))
    try:
        art = make_artefacts(workdir, args, counts[-1])
        base = {
            "backbone": args.backbone, "backbone_kwargs": json.loads(args.backbone_kwargs),
            "backbone_file": art["backbone_file"], "prompts": art["prompts"], "merged": art["merged"],
            "size": args.size, "requests": args.requests, "repeats": args.repeats, "warmup": args.warmup,
            "order": args.order, "seed": args.seed, "method": args.method, "threads": args.threads,
            "image_pool": args.image_pool,
        }
        results = []
        for n in counts:
            for mode in args.modes:
                cfg = dict(base, datasets=n, mode=mode)
                _logger.info("serving %d dataset(s) with %s%s", n, mode, " (own process)" if args.isolate else "")
                r = run_isolated(cfg) if args.isolate else run_config(cfg)
                _logger.info("  %.2f req/s, RSS +%.0f MB, params %.1f MB, load %.1fs", r["requests_per_s"],
                             r["rss_delta_mb"], r["param_mb"], r["setup_s"])
                results.append(r)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    import torch
    import timm

    import promptmatch as pm

    table = markdown_table(results)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    print(f"\nbackbone {args.backbone} ({args.method}, {args.classes} classes), {args.size}px, "
          f"{args.requests} requests x {args.repeats} repeats, order {args.order}, threads {args.threads}, "
          f"{'one process per configuration' if args.isolate else 'in-process'}; "
          f"prompt file {art['prompt_file_mb']:.2f} MB, merged file {art['merged_file_mb']:.1f} MB\n")
    print(table)
    payload = {
        "settings": settings,
        "versions": {"promptmatch": pm.__version__, "torch": torch.__version__, "timm": timm.__version__},
        "prompt_file_mb": art["prompt_file_mb"],
        "merged_file_mb": art["merged_file_mb"],
        "artefact_setup_s": art["setup_s"],
        "results": results,
        "table": table,
        "total_s": time.perf_counter() - t_start,
    }
    if args.out:
        from promptmatch.checkpoint import atomic_write_bytes

        atomic_write_bytes(args.out, (json.dumps(payload, indent=2) + "\n").encode())
        _logger.info("wrote %s", args.out)
    return 0
