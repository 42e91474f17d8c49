"""Measurement: wall time with warm-up and device sync, resident and peak memory, and running
Python in a fresh process.

The benchmark, the ONNX export and the tools under ``tools/`` measure through this module, so
that a median latency or a peak memory figure means the same wherever it is written.

Timing::

    t = time_each(infer, inputs, warmup=2, device=device)   # one call per input
    t = time_call(step, repeats=10, warmup=2)                 # the same call repeated
    ts = time_interleaved({"a": fa, "b": fb}, rounds=20)      # one call of each per round
    t.median_ms, t.min, t.max

Memory: :func:`rss_bytes` (now), :func:`peak_rss_bytes` (``ru_maxrss``, the process's lifetime
peak), :func:`high_water_rss_bytes` / :func:`reset_high_water_rss` (a peak that can be reset,
Linux), :func:`cuda_peak_bytes` / :func:`reset_cuda_peak`. Divide by :data:`MB` for MiB.

Child processes: :func:`run_python` (``python ARGS``) and :func:`call_in_child` (a function of
an importable module, its JSON argument and JSON result passed through files).
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    TypeVar)

__all__ = [
    "MB",
    "Timing",
    "Stopwatch",
    "sync",
    "time_each",
    "time_call",
    "time_interleaved",
    "rss_bytes",
    "peak_rss_bytes",
    "high_water_rss_bytes",
    "reset_high_water_rss",
    "cuda_allocated_bytes",
    "cuda_peak_bytes",
    "reset_cuda_peak",
    "ChildResult",
    "run_python",
    "call_in_child",
]

#: bytes in a MiB, the unit of every ``*_mb`` figure
MB = 2 ** 20

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


# ----------------------------------------------------------------------------- timing
def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return kind == "cuda"


def sync(device: Any = None) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; anything else returns at once)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall times in seconds of timed calls (warm-up calls left out).

    ``samples``: one entry per timed call, in call order; ``warmup``: how many calls ran
    before them untimed. Statistics of no samples are ``nan``.
    """

    samples: Tuple[float, ...]
    warmup: int = 0

    @classmethod
    def from_samples(cls, samples: Sequence[float], warmup: int = 0) -> "Timing":
        """The timing of ``samples[warmup:]``; ``samples`` holds every call, warm-up included."""
        return cls(tuple(float(s) for s in samples[warmup:]), warmup)

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        """Fastest call, seconds."""
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        """Slowest call, seconds."""
        return max(self.samples) if self.samples else float("nan")

    @property
    def median_ms(self) -> float:
        """Median milliseconds per call."""
        return 1000 * self.median

    def __len__(self) -> int:
        return len(self.samples)


class Stopwatch:
    """Wall time of a stretch of work on ``device``: :meth:`start` and :meth:`stop` wait for the
    device first, so queued CUDA work is counted where it was issued."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self._t0: Optional[float] = None

    def start(self) -> None:
        """Start timing (after the work queued so far)."""
        sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start`, the queued work included."""
        if self._t0 is None:
            raise RuntimeError("Stopwatch.stop() without start()")
        sync(self.device)
        dt = time.perf_counter() - self._t0
        self._t0 = None
        return dt


def time_each(fn: Callable[[T], Any], inputs: Iterable[T], warmup: int = 0, device: Any = None) -> Timing:
    """Time ``fn(x)`` for each of ``inputs`` in turn (device synced around each call); the first
    ``warmup`` calls are left out."""
    watch = Stopwatch(device)
    samples: List[float] = []
    for x in inputs:
        watch.start()
        fn(x)
        samples.append(watch.stop())
    return Timing.from_samples(samples, warmup)


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 0, device: Any = None) -> Timing:
    """Time ``warmup + repeats`` calls of ``fn()`` (device synced around each); the first
    ``warmup`` are left out."""
    return time_each(lambda _: fn(), range(warmup + repeats), warmup, device)


def time_interleaved(fns: Mapping[K, Callable[[], Any]], rounds: int, warmup: int = 0, device: Any = None,
                     progress: Optional[Callable[[Iterable[int]], Iterable[int]]] = None) -> Dict[K, Timing]:
    """Time ``fns`` side by side: ``warmup + rounds`` rounds, each calling every function once in
    the mapping's order (device synced around each call), so drift of a shared machine hits all
    alike; the first ``warmup`` rounds are left out. ``progress`` wraps the round iterator
    (e.g. ``tqdm``)."""
    watch = Stopwatch(device)
    samples: Dict[K, List[float]] = {k: [] for k in fns}
    its: Iterable[int] = range(warmup + rounds)
    for _ in (progress(its) if progress is not None else its):
        for k, fn in fns.items():
            watch.start()
            fn()
            samples[k].append(watch.stop())
    return {k: Timing.from_samples(s, warmup) for k, s in samples.items()}


# ----------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS, Windows): psutil reads the same figure there
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size over this process's lifetime (``ru_maxrss``). In a child started
    by ``fork`` + ``exec`` it can hold the parent's RSS at the fork."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def high_water_rss_bytes() -> Tuple[int, str]:
    """This process image's peak resident set size and where it was read: ``"VmHWM"`` of
    /proc/self/status (resettable, :func:`reset_high_water_rss`) where there is one, else
    ``"ru_maxrss"`` (:func:`peak_rss_bytes`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:  # no /proc: fall back to the lifetime peak below
        pass
    return peak_rss_bytes(), "ru_maxrss"


def reset_high_water_rss() -> bool:
    """Reset :func:`high_water_rss_bytes` to the current RSS (Linux >= 4.0: ``echo 5 >
    /proc/self/clear_refs``); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cuda_allocated_bytes(device: Any) -> int:
    """Bytes the CUDA caching allocator holds for tensors on ``device`` now."""
    import torch

    return int(torch.cuda.memory_allocated(device))


def cuda_peak_bytes(device: Any) -> int:
    """Peak of :func:`cuda_allocated_bytes` since the last :func:`reset_cuda_peak`."""
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def reset_cuda_peak(device: Any) -> None:
    """Start a new CUDA peak-memory window on ``device`` (nothing for a non-CUDA device)."""
    if _is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- child processes
@dataclass(frozen=True)
class ChildResult:
    """How a child process ended: ``returncode`` (``None`` when it ran past its timeout and was
    killed), what it wrote to stdout and stderr, and (:func:`call_in_child`) the JSON value the
    function returned (``None`` unless it succeeded)."""

    returncode: Optional[int]
    stdout: str
    stderr: str
    value: Any = None

    @property
    def timed_out(self) -> bool:
        """Whether the child was killed at its timeout."""
        return self.returncode is None

    @property
    def ok(self) -> bool:
        """Whether the child exited with status 0."""
        return self.returncode == 0


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _text(out: Any) -> str:
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


def run_python(args: Sequence[str], timeout: Optional[float] = None, env: Optional[Mapping[str, str]] = None,
               cwd: Optional[os.PathLike] = None) -> ChildResult:
    """Run ``python ARGS`` (this interpreter) in a fresh process and wait for it.

    The child imports the same ``promptmatch`` as this process, installed or not (its folder
    goes first on ``PYTHONPATH``), and never reaches a model hub unless asked
    (``HF_HUB_OFFLINE=1`` unless set). ``env`` entries are set on top of this process's
    environment. stdout and stderr are captured; past ``timeout`` seconds the child is killed.
    """
    full = dict(os.environ)
    full.update(env or {})
    full["PYTHONPATH"] = os.pathsep.join([_package_root()] + ([full["PYTHONPATH"]] if full.get("PYTHONPATH") else []))
    full.setdefault("HF_HUB_OFFLINE", "1")
    try:
        proc = subprocess.run([sys.executable, *map(str, args)], env=full, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a result of its own: the caller reports it
        return ChildResult(None, _text(e.stdout), _text(e.stderr))
    return ChildResult(proc.returncode, proc.stdout, proc.stderr)


_CHILD_CODE = "import sys; from promptmatch.measure import _child_entry; sys.exit(_child_entry(sys.argv[1:]))"


def call_in_child(target: str, payload: Any = None, timeout: Optional[float] = None,
                  env: Optional[Mapping[str, str]] = None) -> ChildResult:
    """Call ``target`` (``"package.module:function"``) with the JSON-serialisable ``payload`` in a
    fresh Python process (as :func:`run_python`) and return its JSON-serialisable result as the
    :class:`ChildResult`'s ``value``. Argument and result travel through files, so whatever the
    child prints does not matter."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    with tempfile.TemporaryDirectory(prefix="pm-child-") as tmp:
        arg_file, out_file = Path(tmp) / "payload.json", Path(tmp) / "result.json"
        arg_file.write_text(json.dumps(payload))
        res = run_python(["-c", _CHILD_CODE, target, str(arg_file), str(out_file)], timeout=timeout, env=env)
        if res.ok and out_file.is_file():
            return ChildResult(res.returncode, res.stdout, res.stderr, json.loads(out_file.read_text()))
    return res


def _child_entry(argv: Sequence[str]) -> int:
    """The child side of :func:`call_in_child`: ``TARGET PAYLOAD_FILE RESULT_FILE``."""
    target, arg_file, out_file = argv
    module, _, name = target.partition(":")
    fn: Any = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    result = fn(json.loads(Path(arg_file).read_text()))
    tmp = Path(out_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out_file)
    return 0
