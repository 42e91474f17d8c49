"""Running an exported ONNX graph with onnxruntime: its agreement with PyTorch
(:func:`compare_onnx`) and the two side by side on the CPU (:func:`measure_latency`).

:func:`promptmatch.export.export_onnx` writes graphs that map normalised ``images``
(N, 3, H, W, float32) to ``logits`` (N, K, H, W) and checks them with :func:`compare_onnx`;
both functions are importable from :mod:`promptmatch.export` as well.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .measure import time_interleaved

__all__ = ["ExportError", "INPUT_NAME", "OUTPUT_NAME", "compare_onnx", "measure_latency", "ort_session",
           "random_images", "check_image_size", "model_device", "on_cpu_float32", "no_tf32"]

_logger = logging.getLogger(__name__)

#: name of the graph's input
INPUT_NAME = "images"
#: name of the graph's output
OUTPUT_NAME = "logits"
PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """A model cannot be exported to ONNX, or the exported graph disagrees with PyTorch."""


def check_image_size(image_size: Sequence[int]) -> Tuple[int, int]:
    """``(height, width)`` of ``image_size``; ``ValueError`` unless two positive ints."""
    if len(image_size) != 2 or any(isinstance(v, bool) or int(v) != v or int(v) <= 0 for v in image_size):
        raise ValueError(f"image_size must be (height, width) positive ints, got {tuple(image_size)!r}")
    return int(image_size[0]), int(image_size[1])


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    ref = next(iter(model.parameters()), None)
    return ref.device if ref is not None else torch.device("cpu")


def _is_cpu_float32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32)


@contextlib.contextmanager
def on_cpu_float32(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` runs on the CPU in float32: every parameter and buffer that is
    elsewhere or in another float dtype holds a CPU float32 copy of its data (integer buffers
    keep their dtype); afterwards each gets its own data back (device, dtype and values exact).

    The tensors stay the same objects (only their ``.data`` is swapped), so hooks and closures
    of tuning methods, and optimisers, keep working; a model on a GPU is never duplicated in
    GPU memory. ONNX graphs are traced and checked this way: onnxruntime runs float32 on the
    CPU, and a CUDA reference (TF32 matmuls and convolutions) or a half-precision one would
    differ from it by more than the check's tolerance for reasons of its own. Not thread-safe:
    nothing else may use the model meanwhile.
    """
    seen: Dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and not _is_cpu_float32(t):
            seen[id(t)] = t
    moved = [(t, t.data) for t in seen.values()]
    try:
        with torch.no_grad():
            for t, data in moved:
                t.data = data.to("cpu", torch.float32 if data.is_floating_point() else data.dtype)
        yield model
    finally:
        for t, data in moved:
            t.data = data


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions in full float32 (no TF32) inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def random_images(n: int, size: Tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    """``n`` standard-normal images (n, 3, H, W), drawn on the CPU from ``seed``, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size[0], size[1], generator=g).to(device)


def ort_session(path: PathLike, threads: int = 0) -> Any:
    """An onnxruntime CPU session of the file ``path`` (``threads`` intra-op threads; 0: its default)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("checking an ONNX export needs onnxruntime: pip install promptmatch[deploy]") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def compare_onnx(
    model: nn.Module, path: PathLike, images: torch.Tensor, session: Any = None
) -> Tuple[float, float]:
    """Run ``model`` (eval, no grad) and the ONNX file on ``images``; return (max abs logit
    difference, fraction of pixels whose argmax class agrees).

    The model runs where it is, on ``images`` moved to its device and float dtype, with TF32
    off on CUDA; onnxruntime runs float32 on the CPU. :func:`promptmatch.export.export_onnx`
    checks with the model on the CPU in float32 (:func:`on_cpu_float32`).
    """
    sess = session if session is not None else ort_session(path)
    ref_param = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = images if ref_param is None else images.to(ref_param.device, ref_param.dtype)
    with torch.no_grad(), no_tf32():
        ref = model(x).float().cpu()
    got = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: images.float().cpu().numpy()})[0])
    if tuple(got.shape) != tuple(ref.shape):
        raise ExportError(f"the ONNX graph returns logits of shape {tuple(got.shape)} for input "
                          f"{tuple(images.shape)}; PyTorch returns {tuple(ref.shape)}")
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    if not math.isfinite(diff):
        diff = float("inf")
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean()) if ref.numel() else 1.0
    return diff, agree


def measure_latency(
    model: nn.Module,
    path: PathLike,
    image_size: Sequence[int],
    runs: int = 20,
    warmup: int = 3,
    batch_size: int = 1,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """CPU latency of ``model`` in PyTorch and of its ONNX file in onnxruntime.

    Both run ``warmup`` times, then ``runs`` interleaved rounds (one PyTorch forward and one
    onnxruntime run per round, so that drift of a shared machine hits both alike) on the
    same random images. onnxruntime gets PyTorch's thread count (``threads``, default
    ``torch.get_num_threads()``). Returns medians in ms and ``speedup`` (PyTorch / onnxruntime).
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    size = check_image_size(image_size)
    threads = int(threads or torch.get_num_threads())
    was_training = model.training
    model.eval()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model_cpu_device = model_device(model)
        if model_cpu_device.type != "cpu":
            raise ValueError(f"measure_latency compares CPU latency; the model is on {model_cpu_device}")
        sess = ort_session(path, threads=threads)
        x = random_images(batch_size, size, 123, torch.device("cpu"))
        feed = {INPUT_NAME: x.numpy()}
        with torch.no_grad():
            times = time_interleaved({"pytorch": lambda: model(x), "onnxruntime": lambda: sess.run([OUTPUT_NAME], feed)},
                                     runs, warmup)
        pt = [t * 1e3 for t in times["pytorch"].samples]
        ox = [t * 1e3 for t in times["onnxruntime"].samples]
    finally:
        torch.set_num_threads(prev_threads)
        model.train(was_training)
    med_pt, med_ox = statistics.median(pt), statistics.median(ox)
    result = {
        "onnx": str(path), "image_size": list(size), "batch_size": batch_size, "threads": threads,
        "runs": runs, "warmup": warmup, "pytorch_ms_median": med_pt, "onnxruntime_ms_median": med_ox,
        "speedup": med_pt / med_ox if med_ox > 0 else None, "pytorch_ms": pt, "onnxruntime_ms": ox,
        "torch_version": torch.__version__,
    }
    try:
        import onnxruntime as ort

        result["onnxruntime_version"] = ort.__version__
    except ImportError:  # pragma: no cover
        pass
    _logger.info("latency at %dx%d, batch %d, %d threads: PyTorch %.1f ms, onnxruntime %.1f ms (x%.2f)",
                 size[0], size[1], batch_size, threads, med_pt, med_ox, result["speedup"] or float("nan"))
    return result
