"""What both engines of a benchmark cell share (the in-process :class:`~.cell.MemoryEngine`
and the mmengine engine of :mod:`.mmseg_cell`): a backbone entry's weights, the evaluations of
a cell, and how a record's memory and time figures are measured."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from promptmatch.measure import MB, Timing, cuda_peak_bytes, peak_rss_bytes, time_each

from .spec import Cell

__all__ = ["weights_for", "eval_sets", "eval_precision", "peak_memory_fields", "peak_rss_mb", "latency_ms",
           "step_time_median"]


def weights_for(backbone: Mapping[str, Any]) -> Tuple[Optional[str], bool, bool]:
    """``(weights path, weights_remap, pretrained)`` of a backbone entry: a packaged weights
    name, ``"pretrained"`` (timm's own) or a local file."""
    from promptmatch.weights import list_offline_weights, offline_weights

    w = backbone.get("weights")
    if w in list_offline_weights():
        _, path, remap = offline_weights(w)
        return str(path), remap, False
    if w == "pretrained":
        return None, False, True
    return w, False, False


def eval_sets(cell: Cell) -> List[Tuple[str, Mapping[str, Any], str]]:
    """``(record key, dataset entry, split)`` of every evaluation of a cell: its own splits,
    then each domain-shift target's as ``"<target>:<split>"``."""
    out = [(sp, cell.dataset, sp) for sp in cell.dataset["splits"]]
    for t in cell.dataset.get("targets") or []:
        out += [(f"{t['name']}:{sp}", t, sp) for sp in t["splits"]]
    return out


def eval_precision(settings: Mapping[str, Any]) -> str:
    """The precision both engines evaluate (mIoU) and time (latency) a cell in, as its record
    says: ``"bf16 autocast"`` / ``"fp16 autocast"`` under the setting's ``amp``, the precision
    it trains in, else ``"float32"``."""
    amp = settings.get("amp")
    return f"{amp} autocast" if amp else "float32"


def peak_rss_mb() -> float:
    """This process's lifetime peak RSS in MiB (``ru_maxrss``): the baseline of a CPU cell."""
    return peak_rss_bytes() / MB


def peak_memory_fields(device: Any, baseline_mb: float, step_peak_bytes: Optional[int] = None) -> Dict[str, Any]:
    """A record's peak-memory fields after training: the CUDA allocator's peak on a GPU (the
    larger of its peak now and ``step_peak_bytes``, the peak an engine read during training
    where something resets the counter, as mmengine's logger does), else this process's peak
    RSS minus ``baseline_mb`` (the peak before the model was built)."""
    if getattr(device, "type", None) == "cuda":
        peak = max(cuda_peak_bytes(device), int(step_peak_bytes or 0))
        return dict(peak_mem_mb=peak / MB, peak_mem_kind="cuda max_memory_allocated")
    peak = peak_rss_mb()
    return dict(peak_mem_mb=peak - baseline_mb, peak_mem_kind="cpu peak RSS - baseline", peak_rss_mb=peak,
                baseline_rss_mb=baseline_mb)


def step_time_median(times: Sequence[float], warmup: int) -> float:
    """Median seconds of the training steps ``times`` after the first ``warmup`` (at least the
    last step is kept)."""
    return Timing.from_samples(times, min(warmup, len(times) - 1)).median


def latency_ms(infer: Callable[[Any], Any], inputs: List[Any], device: Any) -> float:
    """Median wall time (ms) of ``infer`` over ``inputs``, the first two left out (warm-up);
    ``nan`` with two inputs or fewer."""
    return time_each(infer, inputs, warmup=2, device=device).median_ms
