"""Export a prompted segmentor to ONNX (``images -> logits``), checked with onnxruntime.

From an mmseg config and its prompt checkpoint::

    python tools/export.py --config configs/spm/spm_r50-upernet_4xb4-40k_ade20k-512x512.py \\
        --prompts work_dirs/ade20k/prompts.safetensors --out r50.onnx --size 512 512

From a promptmatch prompt checkpoint of a timm model (method, decoder and classes come from
the checkpoint; the frozen backbone's weights do not, so pass them)::

    python tools/export.py --prompts prompts.safetensors --weights resnet50.safetensors \\
        --out model.onnx --size 512 512 [--dynamic] [--latency 20]

Without ``--prompts``, ``--backbone NAME --method M --decoder D --num-classes K`` build a
freshly initialised model (for latency figures). The graph's input ``images`` is
(N, 3, H, W) float32, normalised as in training (the mmseg data preprocessor's mean/std are
not part of it); the output ``logits`` is (N, K, H, W). ``--latency N`` times onnxruntime
against PyTorch on the CPU (median of N interleaved runs each, after warm-up), prints the
figures and writes them to ``<out>.latency.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


_logger = logging.getLogger("promptmatch.tools.export")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_argument_group("model")
    src.add_argument("--segmentor", help="a merged segmentor file (promptmatch.save_segmentor): backbone and "
                     "prompts in one file, nothing else needed")
    src.add_argument("--config", help="mmseg config of a promptmatch model (with --prompts: its checkpoint)")
    src.add_argument("--prompts", help="prompt checkpoint (.safetensors; for --config also an mmengine .pth)")
    src.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                     help="overrides of the mmseg config (values parsed as Python literals where possible)")
    src.add_argument("--backbone", help="timm model name (default: the checkpoint's architecture)")
    src.add_argument("--weights", help="frozen backbone weights: a local file or a packaged name "
                     "(promptmatch.list_offline_weights())")
    src.add_argument("--pretrained", action="store_true", help="timm's default weights from the local cache")
    src.add_argument("--backbone-kwargs", default="{}", help="JSON keyword arguments of timm.create_model")
    src.add_argument("--method", help="tuning method (default: the checkpoint's, else spm)")
    src.add_argument("--method-cfg", help="JSON config of the method (default: the checkpoint's)")
    src.add_argument("--decoder", help="decoder (default: the checkpoint's, else linear)")
    src.add_argument("--decoder-cfg", help="JSON config of the decoder (default: the checkpoint's)")
    src.add_argument("--num-classes", type=int, help="number of classes (default: the checkpoint's, else 150)")
    out = p.add_argument_group("export")
    out.add_argument("--out", required=True, help="the .onnx file to write")
    out.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input size")
    out.add_argument("--dynamic", action="store_true", help="dynamic batch and (where the model allows) spatial axes")
    out.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    out.add_argument("--atol", type=float, default=1e-3, help="tolerance of the onnxruntime check on the logits")
    out.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    out.add_argument("--latency", type=int, default=0, metavar="N",
                     help="time onnxruntime vs PyTorch on the CPU: median of N runs each")
    out.add_argument("--warmup", type=int, default=3, help="warm-up runs before --latency timing")
    out.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch and onnxruntime (0: default)")
    return p.parse_args(argv)


def _json_arg(text: Optional[str], name: str) -> Optional[Dict[str, Any]]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {name} must be a JSON object, got {text!r}")
    return value


def _cfg_options(items: Sequence[str]) -> Dict[str, Any]:
    import ast

    out: Dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --cfg-options takes KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def build_mmseg_model(args: argparse.Namespace):
    """The mmseg promptmatch model (prompts loaded) wrapped to return logits at the input size."""
    from promptmatch.checkpoint import PromptMismatchError
    from promptmatch.export import SegLogitsAtInputSize
    from promptmatch.mmseg.inference import init_model

    try:
        model = init_model(args.config, args.prompts, device="cpu", cfg_options=_cfg_options(args.cfg_options) or None)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    except (PromptMismatchError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    pre = getattr(model, "data_preprocessor", None)
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if mean is not None and std is not None:
        _logger.info("the graph takes normalised images: (x - mean) / std with mean %s, std %s (BGR/RGB as the "
                     "config's data_preprocessor)", [round(float(v), 3) for v in mean.flatten()],
                     [round(float(v), 3) for v in std.flatten()])
    return SegLogitsAtInputSize(model).eval()


def build_timm_model(args: argparse.Namespace):
    """A PromptSegmentor from a prompt checkpoint's record (overridable) or from the flags alone."""
    import promptmatch as pm
    from promptmatch.checkpoint import PromptMismatchError

    meta: Dict[str, Any] = {}
    if args.prompts:
        try:
            meta = pm.read_prompt_metadata(args.prompts)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    arch = args.backbone or (meta.get("backbone") or {}).get("architecture")
    if not arch:
        raise SystemExit("error: give --backbone NAME (or --prompts with a checkpoint, or --config for mmseg)")
    if "." in arch and not args.backbone:
        raise SystemExit(f"error: the checkpoint's backbone {arch!r} is not a timm model name; give --backbone")
    weights, remap = None, False
    if args.weights:
        if args.weights in pm.list_offline_weights():
            _, path, remap = pm.offline_weights(args.weights)
            weights = str(path)
        else:
            weights = args.weights
    method = args.method or meta.get("method") or "spm"
    method_cfg = _json_arg(args.method_cfg, "--method-cfg")
    if method_cfg is None and meta.get("method") == method:
        method_cfg = pm.methods.saved_method_config(method, meta.get("method_config") or {})
    decoder = args.decoder or meta.get("decoder") or "linear"
    decoder_cfg = _json_arg(args.decoder_cfg, "--decoder-cfg")
    if decoder_cfg is None and meta.get("decoder") == decoder:
        decoder_cfg = meta.get("decoder_config")
    num_classes = args.num_classes or meta.get("num_classes") or 150
    stage_modules = (meta.get("backbone") or {}).get("stage_modules")
    try:
        model = pm.create_segmentor(
            arch, method, int(num_classes), decoder, method_cfg=method_cfg, decoder_cfg=decoder_cfg,
            class_names=meta.get("class_names"), pretrained=args.pretrained, weights=weights, weights_remap=remap,
            stage_modules=stage_modules, ignore_index=int(meta.get("ignore_index", 255)),
            backbone_kwargs=_json_arg(args.backbone_kwargs, "--backbone-kwargs") or None)
    except (pm.WeightsNotFoundError, pm.MethodNotApplicableError, ValueError, TypeError) as e:
        raise SystemExit(f"error: cannot build the model: {e}") from None
    if args.prompts:
        try:
            pm.load_prompts(model, args.prompts)
        except PromptMismatchError as e:
            hint = ("\n(the frozen backbone's weights are not in a prompt checkpoint: pass the ones it was trained "
                    "with, --weights PATH or --pretrained, and --backbone-kwargs if the model was built with any)")
            raise SystemExit(f"error: {e}{hint if 'fingerprint' in str(e) else ''}") from None
    else:
        _logger.warning("no --prompts: exporting freshly initialised prompts and head")
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the model, export it, check it, optionally time it; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from this tool
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from promptmatch.export import ExportError, export_onnx, measure_latency

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.segmentor:
        if args.config or args.prompts:
            raise SystemExit("error: --segmentor holds the whole model; give it without --config/--prompts")
        import promptmatch as pm

        model = pm.load_segmentor(args.segmentor)
    elif args.config:
        if args.backbone or args.method or args.decoder or args.num_classes:
            raise SystemExit("error: --backbone/--method/--decoder/--num-classes apply to timm models; with --config "
                             "the config describes the model")
        model = build_mmseg_model(args)
    else:
        model = build_timm_model(args)
    out = Path(args.out)
    try:
        report = export_onnx(model, out, tuple(args.size), dynamic=args.dynamic, opset=args.opset,
                             check=not args.no_check, atol=args.atol)
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {report.path} ({report.file_bytes / 1e6:.2f} MB, opset {report.opset}, dynamic axes "
          f"{report.dynamic_axes or 'none'})")
    if report.max_abs_diff is not None:
        print(f"onnxruntime check: max abs logit diff {report.max_abs_diff:.3g}, argmax agreement "
              f"{100 * report.argmax_agreement:.3f}% at {list(report.checked_sizes)}")
    for note in report.notes:
        print(f"note: {note}")
    if args.latency:
        lat = measure_latency(model, out, tuple(args.size), runs=args.latency, warmup=args.warmup,
                              threads=args.threads or None)
        lat["export"] = report.to_dict()
        path = out.with_suffix(".latency.json")
        from promptmatch.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(lat, indent=2) + "\n").encode())
        print(f"latency ({lat['threads']} threads, median of {lat['runs']}): PyTorch {lat['pytorch_ms_median']:.1f} ms, "
              f"onnxruntime {lat['onnxruntime_ms_median']:.1f} ms, PyTorch/onnxruntime x{lat['speedup']:.2f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
