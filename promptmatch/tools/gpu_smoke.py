"""A short run of everything the library does, on one GPU (or, shortened, on the CPU).

Every method on ViT-B/16 and ResNet-50 (random init unless ``--weights`` gives the ViT's) at
512 px for a few steps in bf16 (SPM also in fp16), whole and sliding-window evaluation,
:func:`promptmatch.predict`, the prompt bank, prompt checkpoints and merged files between the
device and the CPU, ONNX export with its onnxruntime check, a trimmed benchmark spec on both
engines (the mmengine one's GPU peak memory against mmengine's own log), and ``torchrun
--nproc_per_node 1`` of the benchmark and of ``tools/train.py``. Sized for at most 10 minutes
on one H100/H200. Each step is isolated: a failing step is recorded (with the tail of its
traceback) and the run goes on; a step that cannot run here (fp16 on a CPU, no mmseg stack,
no onnxruntime) is skipped with the reason. Prints a table (step, status, seconds, note),
writes every figure as JSON, and exits with 1 if any step failed.

    python tools/gpu_smoke.py --out work_dirs/gpu_smoke.json           # on a GPU machine
    python tools/gpu_smoke.py --device cpu --quick --out smoke.json    # tiny models, on a CPU
    python tools/gpu_smoke.py --only train/vit --only onnx             # steps by name prefix
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import _smoke_steps
from ._common import write_result
from ._smoke_steps import K, SkipStep, package_root

__all__ = ["main", "SmokeRun", "StepResult", "SkipStep"]

_logger = logging.getLogger(__name__)
FULL = {"vit": "vit_base_patch16_224", "resnet": "resnet50"}
QUICK = {"vit": "test_vit", "resnet": "test_resnet"}


@dataclass
class StepResult:
    """One row of the table: ``status`` is ``ok``, ``fail`` or ``skip``."""

    name: str
    status: str
    seconds: float
    note: str = ""
    metrics: Dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmokeRun:
    """The steps of one smoke run and what they share (data, trained models, a work folder)."""

    def __init__(self, device: str = "cuda", size: int = 512, steps: int = 5, quick: bool = False,
                 weights: Optional[str] = None, batch: int = 2, work: Optional[Path] = None,
                 step_timeout: float = 300.0) -> None:
        import torch

        self.device = torch.device(device)
        self.size, self.steps, self.quick, self.batch = size, steps, quick, batch
        self.weights, self.step_timeout = weights, step_timeout
        self.names = QUICK if quick else FULL
        self.work = Path(work or tempfile.mkdtemp(prefix="pm-smoke-"))
        self.results: List[StepResult] = []
        self._models: Dict[Tuple[str, str, str], Any] = {}
        self._data: Optional[Tuple[Any, Any]] = None
        self._folder: Optional[Path] = None

    # ------------------------------------------------------------------ shared parts
    def data(self) -> Tuple[Any, Any]:
        """8 synthetic images at ``size`` whose label is the colour class of their quadrant."""
        if self._data is None:
            import torch

            g = torch.Generator().manual_seed(0)
            lab = torch.randint(0, K, (8, 2, 2), generator=g)
            lab = lab.repeat_interleave(self.size // 2, 1).repeat_interleave(self.size // 2, 2)
            palette = torch.rand(K, 3, generator=g) * 2 - 1
            imgs = palette[lab].permute(0, 3, 1, 2) + 0.3 * torch.randn(8, 3, self.size, self.size, generator=g)
            self._data = (imgs.contiguous(), lab)
        return self._data

    def build(self, bb: str, method: str, seed: int = 0):
        """A segmentor of backbone ``bb`` (``vit``/``resnet``) on the device; the same seed
        gives the same frozen backbone."""
        import torch

        import promptmatch as pm

        torch.manual_seed(seed)
        weights = self.weights if bb == "vit" else None
        return pm.create_segmentor(self.names[bb], method, K, "linear", weights=weights).to(self.device)

    def trained(self, bb: str, method: str, amp: Optional[str] = "bf16"):
        """``(model, training record)`` after ``steps`` steps (cached: later steps reuse it)."""
        key = (bb, method, str(amp))
        if key not in self._models:
            import torch

            from promptmatch.training import train_segmentor

            model = self.build(bb, method)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            run = train_segmentor(model, *self.data(), self.steps, self.batch, 1e-4, device=self.device, amp=amp)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
            self._models[key] = (model.eval(), dict(run, peak_mb=peak))
        return self._models[key]

    def forget(self, bb: str, method: str, amp: Optional[str]) -> None:
        """Drop a trained model from the cache (its memory goes back to the device)."""
        self._models.pop((bb, method, str(amp)), None)

    def folder(self) -> Path:
        """A small image/mask folder dataset at ``size`` (mmseg layout) for the benchmark steps."""
        if self._folder is None:
            import numpy as np
            from PIL import Image

            root = self.work / "folder"
            rng = np.random.default_rng(0)
            palette = rng.integers(0, 256, (3, 3))
            for split, n in (("train", 8), ("val", 3)):
                (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
                (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    cells = rng.integers(0, 3, (4, 4))
                    mask = np.kron(cells, np.ones((self.size // 4, self.size // 4), dtype=np.int64)).astype(np.uint8)
                    img = palette[mask] + rng.normal(0, 20, mask.shape + (3,))
                    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img_dir" / split / f"{i}.png")
                    Image.fromarray(mask).save(root / "ann_dir" / split / f"{i}.png")
            (root / "classes.json").write_text(json.dumps(["a", "b", "c"]))
            self._folder = root
        return self._folder

    def spec(self, engine: str, methods: Sequence[str] = ("linear", "spm")) -> Dict[str, Any]:
        """The trimmed benchmark spec of one engine (the folder dataset, a few steps, bf16)."""
        if engine == "mmengine" and not self.quick:
            backbone = {"name": "upernet_r50", "mmseg_model": "mmseg::_base_/models/upernet_r50.py"}
        else:
            backbone = {"name": self.names["vit" if engine == "memory" else "resnet"]}
            if engine == "memory" and self.weights:
                backbone["weights"] = self.weights
        crop = self.size // 2
        return {"name": f"smoke-{engine}", "methods": list(methods), "backbones": [backbone],
                "datasets": [{"name": "smoke", "folder": str(self.folder())}], "seeds": [0],
                "device": self.device.type,
                "settings": {"image_size": self.size, "steps": max(2, self.steps), "batch": self.batch, "warmup": 1,
                             "eval_batch": 4, "latency_images": 2, "workers": 2 if not self.quick else 0,
                             "engine": engine, "amp": "bf16",
                             # sliding windows cost 9 passes an image: the shortened form evaluates whole
                             **({} if self.quick else {"eval_mode": "slide", "eval_crop": crop,
                                                       "eval_stride": crop // 2})}}

    def child_env(self) -> Dict[str, str]:
        """Environment of a child process: offline, this promptmatch importable, and no GPU
        at all for a CPU run (so torchrun takes gloo and mmengine the CPU on a GPU machine)."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(package_root())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                          else []))
        if self.device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def torchrun(self, args: Sequence[str], name: str) -> subprocess.CompletedProcess:
        """``torchrun --nproc_per_node 1 ARGS``; its output goes to ``<work>/<name>.log``."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(_free_port()), *args]
        proc = subprocess.run(cmd, cwd=self.work, env=self.child_env(), capture_output=True, text=True,
                              timeout=self.step_timeout)
        (self.work / f"{name.replace('/', '_')}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return proc

    # ------------------------------------------------------------------ running
    def plan(self) -> List[Tuple[str, Callable[[], Tuple[str, Dict[str, Any]]]]]:
        """Every step as ``(name, function)``; a function returns ``(note, metrics)`` or raises."""
        import promptmatch as pm

        s = _smoke_steps

        plan: List[Tuple[str, Callable[[], Tuple[str, Dict[str, Any]]]]] = []
        for bb in ("vit", "resnet"):
            for method in pm.list_methods():
                plan.append((f"train/{bb}/{method}/bf16", lambda bb=bb, m=method: s.train(self, bb, m, "bf16")))
            plan.append((f"train/{bb}/spm/fp16", lambda bb=bb: s.train(self, bb, "spm", "fp16")))
            for mode in ("whole", "slide"):
                plan.append((f"eval/{bb}/{mode}", lambda bb=bb, mode=mode: s.evaluate(self, bb, mode)))
            plan.append((f"predict/{bb}", lambda bb=bb: s.predict(self, bb)))
            plan.append((f"onnx/{bb}", lambda bb=bb: s.onnx(self, bb)))
        plan += [("bank/vit", lambda: s.bank(self)), ("save_load/vit", lambda: s.save_load(self)),
                 ("bench/memory", lambda: s.bench(self, "memory")),
                 ("bench/mmengine", lambda: s.bench(self, "mmengine")),
                 ("torchrun/bench", lambda: s.torchrun_bench(self)), ("torchrun/train", lambda: s.torchrun_train(self))]
        return plan

    def run_step(self, name: str, fn: Callable[[], Tuple[str, Dict[str, Any]]]) -> StepResult:
        """Run one step, whatever it raises; the result is recorded and returned."""
        t0 = time.perf_counter()
        try:
            note, metrics = fn()
            res = StepResult(name, "ok", 0.0, note, metrics)
        except SkipStep as e:
            res = StepResult(name, "skip", 0.0, str(e))
        except Exception as e:  # noqa: BLE001  (a failing step is a result; the run goes on)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            res = StepResult(name, "fail", 0.0, f"{type(e).__name__}: {first}", error=traceback.format_exc()[-4000:])
        finally:
            self._empty_cache()
        res.seconds = time.perf_counter() - t0
        self.results.append(res)
        _logger.info("%-28s %-4s %7.1f s  %s", res.name, res.status, res.seconds, res.note)
        return res

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def run(self, only: Optional[Sequence[str]] = None) -> List[StepResult]:
        """Run the planned steps whose name starts with one of ``only`` (all when empty)."""
        for name, fn in self.plan():
            if only and not any(name.startswith(p) for p in only):
                continue
            self.run_step(name, fn)
        return self.results


def _table(results: Sequence[StepResult]) -> str:
    rows = [("step", "status", "seconds", "note")] + [(r.name, r.status, f"{r.seconds:.1f}", r.note) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + " | " + row[3])
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 4)
    return "\n".join(lines)


def _environment(run: SmokeRun) -> Dict[str, Any]:
    import platform

    import timm
    import torch

    import promptmatch

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "promptmatch": promptmatch.__version__, "device": str(run.device)}
    if run.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(run.device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(run.device).total_memory / 2**30, 1)
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the smoke steps, print the table, write the JSON; 1 if a step failed, 2 on bad usage."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--size", type=int, default=None, help="square image side (default 512; --quick: 64)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 5; --quick: 2)")
    ap.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="the shortened form: tiny timm models (test_vit, test_resnet), 64 px, 2 steps (CI, CPUs)")
    ap.add_argument("--only", action="append", default=[],
                    help="run only the steps whose name starts with this (repeatable, or comma-separated), "
                    "e.g. train/vit, eval, bench")
    ap.add_argument("--weights", help="a local timm ViT-B/16 state dict for the ViT (default: random init)")
    ap.add_argument("--step-timeout", type=float, default=300, help="seconds for each torchrun step (default 300)")
    ap.add_argument("--work-dir", help="keep the steps' files here (default: a temporary folder, removed)")
    ap.add_argument("--out", default="work_dirs/gpu_smoke.json", help="the JSON file to write")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        print(f"error: --device must be cuda, cuda:N or cpu, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available here (torch {torch.__version__} sees no GPU); "
              "run on a GPU machine, or use --device cpu --quick", file=sys.stderr)
        return 2
    if args.weights and not Path(args.weights).is_file():
        print(f"note: --weights {args.weights} is not a file; the ViT steps will fail with the reason", file=sys.stderr)
    size = args.size or (64 if args.quick else 512)
    steps = args.steps or (2 if args.quick else 5)
    if size % 32:
        print(f"error: --size must be a multiple of 32 (patch 16 and stride 32 for the sliding windows), got {size}",
              file=sys.stderr)
        return 2
    only = [p.strip() for o in args.only for p in o.split(",") if p.strip()]
    work = Path(args.work_dir) if args.work_dir else None
    tmp = None if work else tempfile.TemporaryDirectory(prefix="pm-smoke-")
    run = SmokeRun(args.device, size, steps, args.quick, args.weights, args.batch, work or Path(tmp.name),
                   args.step_timeout)
    if args.list:
        print("\n".join(name for name, _ in run.plan()))
        return 0
    t0 = time.perf_counter()
    try:
        results = run.run(only)
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - t0
    failed = [r.name for r in results if r.status == "fail"]
    print(_table(results))
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "fail", "skip")}
    print(f"{len(results)} steps in {total:.0f} s: {counts['ok']} ok, {counts['fail']} failed, {counts['skip']} skipped")
    write_result(args.out, {"environment": _environment(run), "size": size, "steps": steps, "batch": args.batch,
                            "quick": args.quick, "weights": args.weights, "only": only, "total_s": total,
                            "counts": counts, "failed": failed, "results": [r.__dict__ for r in results]})
    if not results:
        print(f"error: no step matches --only {only}; see --list", file=sys.stderr)
        return 2
    return 1 if failed else 0
