"""ONNX export of prompted segmentors: ``model(images) -> logits``, checked with onnxruntime.

:func:`export_onnx` writes one ``.onnx`` file whose graph maps normalised images
``images`` (N, 3, H, W, float32) to class logits ``logits`` (N, K, H, W), and (by default)
checks it against PyTorch with onnxruntime on the CPU before the file appears. The check and
the latency comparison live in :mod:`promptmatch.onnx_check` (``compare_onnx``,
``measure_latency``, ``ExportError``; importable from here as well).

Exporter and opset
------------------
The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used. The
prompted forward runs through forward hooks on stage modules and ends the backbone early
by raising an exception from the last boundary hook; tracing records exactly the tensor
operations that run, so hooks, the recurrent SPM state, peft's LoRA layers and the early
stop need nothing special. The dynamo exporter needs the ``onnxscript`` package as well and
specialises on the Python integers the staging takes from input shapes anyway.

The default opset is 18: timm ViTs built with ``dynamic_img_size=True`` (as
:func:`promptmatch.create_backbone` builds them) resample their position embeddings with
antialiased bicubic interpolation, which the exporter has no symbolic for; from opset 18
ONNX ``Resize`` has an ``antialias`` attribute, and this module maps the op onto it
(cubic coefficient -0.5, ``exclude_outside``; matches PyTorch to ~1e-6).

Dynamic shapes
--------------
``dynamic=True`` asks for a dynamic batch axis and dynamic spatial axes. Token backbones
(ViT, Swin, ...) are staged with their patch grid computed from the input size at trace
time, so their spatial axes cannot be dynamic: they are exported with a dynamic batch and
a static size, and the report (and a warning) says so. Which case applies is decided by
trying: the dynamic export is checked at a second size, and a model that gives other
results there is re-exported with spatial axes fixed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._atomic import new_temporary
from .onnx_check import (INPUT_NAME, OUTPUT_NAME, ExportError, check_image_size, compare_onnx, measure_latency,
                         on_cpu_float32, ort_session, random_images)

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportReport",
    "export_onnx",
    "compare_onnx",
    "measure_latency",
    "SegLogitsAtInputSize",
]

_logger = logging.getLogger(__name__)

#: default ONNX opset (Resize with ``antialias`` needs 18)
DEFAULT_OPSET = 18
#: lowest opset the exporter is asked for
MIN_OPSET = 13
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it agrees with PyTorch.

    ``dynamic_axes``: the axes of ``images`` exported as dynamic (``{0: "batch", 2: "height",
    3: "width"}``, only ``{0: "batch"}`` where the spatial size had to stay fixed, or empty).
    ``max_abs_diff`` / ``argmax_agreement``: the worst figures over ``checked_sizes``
    (``None`` when not checked). ``notes``: anything the caller should know (e.g. why the
    spatial axes are static).
    """

    path: Path
    opset: int
    dynamic: bool
    max_abs_diff: Optional[float]
    argmax_agreement: Optional[float]
    file_bytes: int
    image_size: Tuple[int, int]
    dynamic_axes: Dict[int, str] = field(default_factory=dict)
    checked_sizes: Tuple[Tuple[int, int, int], ...] = ()
    exporter: str = "torchscript"
    notes: Tuple[str, ...] = ()

    @property
    def dynamic_spatial(self) -> bool:
        """Whether height and width are dynamic in the exported graph."""
        return 2 in self.dynamic_axes and 3 in self.dynamic_axes

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "path": str(self.path), "opset": self.opset, "dynamic": self.dynamic,
            "max_abs_diff": self.max_abs_diff, "argmax_agreement": self.argmax_agreement,
            "file_bytes": self.file_bytes, "image_size": list(self.image_size),
            "dynamic_axes": {str(k): v for k, v in self.dynamic_axes.items()},
            "checked_sizes": [list(s) for s in self.checked_sizes], "exporter": self.exporter,
            "notes": list(self.notes),
        }


class SegLogitsAtInputSize(nn.Module):
    """``images -> logits (N, K, H, W)`` for a model whose tensor output is coarser than its
    input (an mmseg ``EncoderDecoder``: ``forward(inputs, mode='tensor')`` gives the decode
    head's logits); they are resized bilinearly to the input size as mmseg's postprocessing
    does (``align_corners`` of the decode head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        head = getattr(model, "decode_head", None)
        self.align_corners = bool(getattr(head, "align_corners", False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images, mode="tensor")
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return out


# ----------------------------------------------------------------- symbolics
def _resize_aa_symbolic(mode: str, cubic_coeff_a: float) -> Callable:
    """Symbolic of ``aten::_upsample_{bilinear,bicubic}2d_aa`` as ONNX ``Resize`` (opset >= 18)
    with ``antialias=1``; ``exclude_outside=1`` and a=-0.5 match PyTorch's antialias kernels."""

    def symbolic(g, input, output_size, align_corners, scale_factors):  # noqa: ANN001 - graph values
        from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

        align = sh._maybe_get_const(align_corners, "b")
        ctm = "align_corners" if align is True else "half_pixel"
        empty = sh._optional_input_placeholder_tensor(g)
        attrs = dict(coordinate_transformation_mode_s=ctm, mode_s=mode, antialias_i=1,
                     cubic_coeff_a_f=cubic_coeff_a, exclude_outside_i=1)
        if not sh._is_none(output_size):
            sizes = output_size
            if sh._is_packed_list(sizes):
                parts = [g.op("Cast", sh._unsqueeze_helper(g, v, [0]), to_i=7)  # 7: INT64
                         for v in sh._unpack_list(sizes)]
                sizes = g.op("Concat", *parts, axis_i=0)
            else:
                sizes = g.op("Cast", sizes, to_i=7)
            lead = sh._slice_helper(g, g.op("Shape", input), axes=[0], starts=[0], ends=[2])
            sizes = g.op("Concat", lead, sizes, axis_i=0)
            return g.op("Resize", input, empty, empty, sizes, **attrs)
        scales = sh._maybe_get_const(scale_factors, "fs")
        if not isinstance(scales, (list, tuple)):
            raise ExportError("antialiased resize with non-constant scale factors cannot be exported")
        scales_t = g.op("Constant", value_t=torch.tensor([1.0, 1.0, *scales], dtype=torch.float32))
        return g.op("Resize", input, empty, scales_t, **attrs)

    return symbolic


_AA_SYMBOLICS = {
    "aten::_upsample_bicubic2d_aa": _resize_aa_symbolic("cubic", -0.5),
    "aten::_upsample_bilinear2d_aa": _resize_aa_symbolic("linear", -0.75),
}


_REGISTERED_OPSETS: set = set()


def _register_antialias_symbolics(opset: int) -> None:
    """Register the antialiased-resize symbolics for ``opset`` (>= 18), once per opset.

    They stay registered: they only add support for ops the exporter otherwise refuses, and
    torch's ``unregister_custom_op_symbolic`` leaves the op's entry empty, which breaks later
    exports at lower opsets ("min() arg is an empty sequence").
    """
    if opset < 18 or opset in _REGISTERED_OPSETS:
        return
    from torch.onnx import register_custom_op_symbolic

    for name, fn in _AA_SYMBOLICS.items():
        register_custom_op_symbolic(name, fn, opset)
    _REGISTERED_OPSETS.add(opset)


# -------------------------------------------------------------------- helpers
def _describe(model: nn.Module) -> str:
    """``method 'spm' on backbone 'resnet50'`` or the model's class name."""
    inner = getattr(model, "model", model) if isinstance(model, SegLogitsAtInputSize) else model
    method = getattr(inner, "method_name", None)
    backbone = getattr(inner, "backbone", None)
    arch = None
    if backbone is not None:
        from .checkpoint import backbone_architecture

        arch = backbone_architecture(getattr(backbone, "model", backbone))
    if method is None:
        return type(inner).__name__
    return f"method {method!r} on backbone {arch!r}"


def _staged(model: nn.Module) -> Any:
    inner = getattr(model, "model", model) if isinstance(model, SegLogitsAtInputSize) else model
    return getattr(inner, "staged", None)


def _size_step(model: nn.Module) -> int:
    """The multiple input sides should have: the largest stage stride and the patch size."""
    staged = _staged(model)
    if staged is None:
        return 32
    step = max((s.reduction for s in staged.stages), default=32) or 32
    if staged.patch_size is not None:
        step = math.lcm(step, *staged.patch_size)
    return int(step)


def _axes_words(axes: Dict[int, str], size: Tuple[int, int], outcome: bool = True) -> str:
    """'spatial axes are static (HxW); batch stays dynamic' and the like."""
    if not outcome:
        return "the batch and spatial axes" if 2 in axes else "the batch axis"
    if 0 in axes:
        return f"spatial axes are static ({size[0]}x{size[1]}); batch stays dynamic"
    return f"all axes are static (1x3x{size[0]}x{size[1]})"


@contextlib.contextmanager
def _captured_stdout(sink: List[str]) -> Iterator[None]:
    """Send file descriptor 1 to a temporary file while the block runs and append what was
    written to ``sink``: the exporter's C++ code prints the whole graph when it fails."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (e.g. a notebook): nothing to capture
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            try:
                sys.stdout.flush()
            finally:
                os.dup2(saved, fd)
                os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


def _export_file(model: nn.Module, images: torch.Tensor, path: Path, opset: int,
                 dynamic_axes: Dict[int, str]) -> None:
    """One TorchScript-exporter run to ``path``; exporter failures become :class:`ExportError`."""
    axes = None
    if dynamic_axes:
        axes = {INPUT_NAME: dict(dynamic_axes), OUTPUT_NAME: dict(dynamic_axes)}
    _register_antialias_symbolics(opset)
    printed: List[str] = []
    failure: Optional[BaseException] = None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints taken from shapes
        try:
            with _captured_stdout(printed):
                torch.onnx.export(
                    model, (images,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False,
                    verbose=False,
                )
        except ExportError:
            raise
        except Exception as e:
            failure = e
    if printed and printed[0].strip():
        _logger.debug("exporter output:\n%s", printed[0])
    if failure is not None:
        text = str(failure).strip()
        msg = text.splitlines()[0][:400] if text else type(failure).__name__
        hint = ""
        if "_aa" in msg and opset < 18:
            hint = " (antialiased resizing, e.g. of ViT position embeddings, needs opset >= 18)"
        raise ExportError(f"cannot export {_describe(model)} to ONNX (opset {opset}): "
                          f"{type(failure).__name__}: {msg}{hint}") from failure


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ export
def export_onnx(
    model: nn.Module,
    path: PathLike,
    image_size: Sequence[int] = (512, 512),
    dynamic: bool = False,
    opset: Optional[int] = None,
    check: bool = True,
    atol: float = 1e-3,
    *,
    min_agreement: float = 0.999,
    seed: int = 0,
) -> ExportReport:
    """Export ``model(images) -> logits`` (eval mode) to the ONNX file ``path``.

    Args:
        model: a :class:`~promptmatch.PromptSegmentor` (or any module mapping normalised
            images (N, 3, H, W) to logits (N, K, H, W); wrap an mmseg model in
            :class:`SegLogitsAtInputSize`), on any device and in any float dtype: it is traced
            and checked on the CPU in float32, onnxruntime's precision (a CUDA reference with
            TF32 would differ by more than ``atol``), on a copy of its tensors; afterwards it
            has its own tensors, device, dtype and train/eval mode back.
        path: the ``.onnx`` file; written atomically (a temporary file in the same folder,
            renamed once export and check succeeded), so a failure leaves any old file as is.
        image_size: (height, width) the graph is traced (and checked) at.
        dynamic: dynamic batch and spatial axes; token backbones keep a static size (see the
            module docstring) and the report says so.
        opset: ONNX opset (default :data:`DEFAULT_OPSET`, 18).
        check: run onnxruntime (CPU) on random images and compare with PyTorch: the max abs
            logit difference must be <= ``atol`` and the argmax agree on >= ``min_agreement``
            of the pixels, at ``image_size`` (batch 1) and, when dynamic, at batch 2 and (if
            the spatial axes are dynamic) a second size; otherwise :class:`ExportError`.
        atol: tolerance on the logits.
        min_agreement: minimum fraction of pixels whose argmax agrees.
        seed: seed of the random check images.

    Raises:
        ExportError: the exporter cannot handle the model (names the method and backbone and
            why), or the exported graph disagrees with PyTorch (says by how much).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = check_image_size(image_size)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the export path must end in .onnx, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    what = _describe(model)
    # traced and checked on the CPU in float32, what onnxruntime runs: a model elsewhere (a GPU,
    # with TF32) or in another dtype runs on a CPU float32 copy of its tensors meanwhile
    device = torch.device("cpu")
    was_training = model.training
    t0 = time.perf_counter()
    tmp = new_temporary(path)  # mode: the user's umask, as for any new file
    on_cpu = contextlib.ExitStack()
    try:
        on_cpu.enter_context(on_cpu_float32(model))
        model.eval()
        example = random_images(1, size, seed, device)
        with torch.no_grad():
            try:
                out = model(example)
            except Exception as e:
                raise ExportError(f"{what} does not run on a {size[0]}x{size[1]} input: {e}") from e
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or tuple(out.shape[-2:]) != size:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ExportError(f"{what} must return logits (N, K, {size[0]}, {size[1]}) to be exported; got {got}")

        notes: List[str] = []
        axes: Dict[int, str] = {0: "batch", 2: "height", 3: "width"} if dynamic else {}
        attempts = [axes] if not dynamic else [axes, {0: "batch"}, {}]
        checked: List[Tuple[int, int, int]] = []
        worst_diff: Optional[float] = None
        worst_agree: Optional[float] = None
        for i, axes in enumerate(attempts):
            try:
                _export_file(model, example, tmp, opset, axes)
            except ExportError as e:
                if i + 1 >= len(attempts):
                    raise
                note = (f"{_axes_words(attempts[i + 1], size)}: the exporter cannot make {_axes_words(axes, size, False)} "
                        f"dynamic for {what} ({e})")
                _logger.warning("ONNX export: %s", note)
                notes.append(note)
                continue
            _record_normalisation(tmp, model)
            try:
                import onnx

                onnx.checker.check_model(str(tmp))
            except ImportError:  # pragma: no cover - onnx comes with the exporter
                pass
            except Exception as e:
                raise ExportError(f"the ONNX graph of {what} is invalid: {e}") from e
            if not check and not axes:
                break
            sizes = [(1, *size)]
            if 0 in axes:
                sizes.append((2, *size))
            if 2 in axes:
                step = _size_step(model)
                sizes.append((2, size[0] + step, size[1] + 2 * step))
            sess = ort_session(tmp)
            checked, diffs, agrees, failure, failed_at = [], [], [], None, None
            for j, (n, h, w) in enumerate(sizes):
                failed_at = (n, h, w)
                imgs = random_images(n, (h, w), seed + 1 + j, device)
                try:
                    d, a = compare_onnx(model, tmp, imgs, session=sess)
                except ExportError as e:
                    failure = str(e)
                    break
                except Exception as e:  # onnxruntime refuses the shape: baked-in sizes
                    failure = f"onnxruntime fails on input {(n, 3, h, w)}: {type(e).__name__}: {str(e)[:300]}"
                    break
                checked.append((n, h, w))
                diffs.append(d)
                agrees.append(a)
                if d > atol or a < min_agreement:
                    checked.pop()
                    failure = (f"at input {(n, 3, h, w)} the max abs logit difference is {d:.3g} (atol {atol:g}) and "
                               f"the argmax agrees on {100 * a:.3f}% of pixels (need {100 * min_agreement:.3f}%)")
                    break
            del sess
            if failure is None:
                worst_diff = max(diffs) if diffs else None
                worst_agree = min(agrees) if agrees else None
                break
            if dynamic and i + 1 < len(attempts) and failed_at != (1, *size):
                # right at the traced size only: sizes baked in at trace time
                note = (f"{_axes_words(attempts[i + 1], size)}: {what} computes sizes (e.g. its token grid) from "
                        f"the input shape at trace time ({failure})")
                _logger.warning("ONNX export: %s", note)
                notes.append(note)
                continue
            raise ExportError(f"the ONNX export of {what} disagrees with PyTorch: {failure}")
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        model.train(was_training)
        on_cpu.close()  # the model's own tensors back
    report = ExportReport(
        path=path, opset=opset, dynamic=bool(dynamic), max_abs_diff=worst_diff if check else None,
        argmax_agreement=worst_agree if check else None, file_bytes=path.stat().st_size, image_size=size,
        dynamic_axes=dict(axes), checked_sizes=tuple(checked) if check else (), notes=tuple(notes),
    )
    _logger.info("exported %s to %s (%.1f MB, opset %d, dynamic axes %s) in %.1fs; max abs diff %s, argmax "
                 "agreement %s", what, path, report.file_bytes / 1e6, opset, report.dynamic_axes or "none",
                 time.perf_counter() - t0, report.max_abs_diff, report.argmax_agreement)
    return report


def _record_normalisation(path: Path, model: nn.Module) -> None:
    """Write the ``(mean, std)`` the graph's inputs must be normalised with (a segmentor's
    ``input_normalisation``) into the file's metadata as ``input_mean`` / ``input_std``."""
    stats = getattr(model, "input_normalisation", None)
    if stats is None:
        return
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx comes with the exporter
        return
    graph = onnx.load(str(path))
    for key, values in zip(("input_mean", "input_std"), stats):
        prop = graph.metadata_props.add()
        prop.key, prop.value = key, json.dumps([float(v) for v in values])
    onnx.save(graph, str(path))
