"""Domain shifts of the validation scenes, and the one registry of them.

Every entry of :data:`SHIFT_REGISTRY` gives a split ``val_<name>`` holding the validation
scenes (same ids as ``val``) under that shift; :data:`SHIFTS` and :data:`SPLITS` are derived
from it, and the build writes the splits in its order. Adding a shift is adding one entry.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np
from PIL import Image, ImageFilter

from .scenes import Rendered, View, _Scene
from .sources import _SourceBank

__all__ = ["Shift", "ShiftFn", "SHIFT_REGISTRY", "SHIFTS", "SPLITS"]

Range = Tuple[float, float]
#: ``(scene, rendered, bank, rng) -> ((image, label, crops), params)``: the shifted version of
#: a validation scene (``rendered`` is its rendering at full view) and the JSON-serialisable
#: parameters drawn from ``rng``.
ShiftFn = Callable[[_Scene, Rendered, _SourceBank, np.random.Generator], Tuple[Rendered, Dict[str, Any]]]
#: ``(image, rng) -> (image, params)``: a shift of the pixels that keeps the labels.
PixelShiftFn = Callable[[np.ndarray, np.random.Generator], Tuple[np.ndarray, Dict[str, Any]]]


@dataclass(frozen=True)
class Shift:
    """One domain shift of the validation scenes.

    Attributes:
        name: the shift's name; its split is ``val_<name>``.
        description: one line for humans (recorded in ``meta.json``).
        apply: the shift itself (see :data:`ShiftFn`); it draws its parameters from the
            random generator it is given, which is the shift's own stream.
    """

    name: str
    description: str
    apply: ShiftFn

    @property
    def split(self) -> str:
        """The split this shift is written to: ``val_<name>``."""
        return f"val_{self.name}"


def _on_pixels(fn: PixelShiftFn) -> ShiftFn:
    """A shift that changes only the image of a rendered scene, with ``fn``."""

    def apply(scene: _Scene, rendered: Rendered, bank: _SourceBank,
              rng: np.random.Generator) -> Tuple[Rendered, Dict[str, Any]]:
        img, label, crops = rendered
        out, params = fn(img, rng)
        return (out, label, crops), params

    return apply


def _colour_shift(img: np.ndarray, rng: np.random.Generator, *, hue: Range,
                  saturation: Tuple[Range, Range], contrast: Tuple[Range, Range], gains: Range,
                  brightness: float) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Hue rotation by a fraction of the circle in ``hue`` (either way), saturation and
    contrast factors from the lower or upper range (even odds), per-channel ``gains`` and
    a brightness offset within +-``brightness``."""
    hue_turn = float(rng.choice([-1.0, 1.0]) * rng.uniform(*hue))
    sat = float(rng.uniform(*saturation[0]) if rng.random() < 0.5 else rng.uniform(*saturation[1]))
    con = float(rng.uniform(*contrast[0]) if rng.random() < 0.5 else rng.uniform(*contrast[1]))
    gain = rng.uniform(*gains, 3)
    offset = float(rng.uniform(-brightness, brightness))
    hsv = np.asarray(Image.fromarray(img, "RGB").convert("HSV")).astype(np.float64)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue_turn * 256.0, 256.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
    x = np.asarray(Image.fromarray(np.round(hsv).astype(np.uint8), "HSV").convert("RGB"))
    x = x.astype(np.float64)
    x = (x - x.mean()) * con + x.mean()
    x = x * gain + offset
    out = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return out, {"hue": hue_turn, "saturation": sat, "contrast": con,
                 "gains": [float(g) for g in gain], "brightness": offset}


def _blur_shift(img: np.ndarray, rng: np.random.Generator, *, radius: Range
                ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Gaussian blur with a radius (pixels) in ``radius``."""
    r = float(rng.uniform(*radius))
    out = np.asarray(Image.fromarray(img, "RGB").filter(ImageFilter.GaussianBlur(r)))
    return out, {"radius": r}


def _noise_shift(img: np.ndarray, rng: np.random.Generator, *, sigma: Range
                 ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Additive Gaussian noise, one standard deviation (of 255) in ``sigma`` per image."""
    s = float(rng.uniform(*sigma))
    x = img.astype(np.float64) + rng.normal(0.0, s, img.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8), {"sigma": s}


def _jpeg_shift(img: np.ndarray, rng: np.random.Generator, *, quality: Tuple[int, int]
                ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """JPEG re-encoding (Pillow, 4:2:0 chroma subsampling) at a quality in ``quality``
    (inclusive), decoded back."""
    q = int(rng.integers(quality[0], quality[1] + 1))
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        out = np.asarray(im.convert("RGB"))
    return out, {"quality": q}


def _gamma_shift(img: np.ndarray, rng: np.random.Generator, *, gamma: Tuple[Range, Range]
                 ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """``x ** gamma`` on [0, 1] intensities, gamma from the lower (brighter) or upper
    (darker) range (even odds)."""
    g = float(rng.uniform(*gamma[0]) if rng.random() < 0.5 else rng.uniform(*gamma[1]))
    x = (img.astype(np.float64) / 255.0) ** g
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8), {"gamma": g}


def _convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``img`` (H, W, C uint8) convolved per channel with the normalised odd-sized
    ``kernel`` (edges: mirrored), rounded back to uint8."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    x = np.pad(img.astype(np.float64), ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    out = np.zeros(img.shape, np.float64)
    flipped = kernel[::-1, ::-1]  # convolution, not correlation
    for i, j in zip(*np.nonzero(flipped)):
        out += flipped[i, j] * x[i:i + h, j:j + w]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _supersampled_kernel(inside: Callable[[np.ndarray, np.ndarray], np.ndarray], half: int,
                         sub: int = 8) -> np.ndarray:
    """A ``(2 half + 1)``-square kernel: the fraction of each pixel where ``inside(x, y)``
    holds (``sub`` x ``sub`` samples per pixel), normalised to sum 1."""
    t = (np.arange((2 * half + 1) * sub) + 0.5) / sub - half - 0.5
    x, y = np.meshgrid(t, t)
    k = inside(x, y).astype(np.float64).reshape(2 * half + 1, sub, 2 * half + 1, sub).mean(axis=(1, 3))
    return k / k.sum()


def _defocus_shift(img: np.ndarray, rng: np.random.Generator, *, radius: Range
                   ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Defocus: convolution with a pillbox (disk) kernel of a radius (pixels) in ``radius``,
    pixels partly inside the disk weighted by their covered fraction."""
    r = float(rng.uniform(*radius))
    kernel = _supersampled_kernel(lambda x, y: x * x + y * y <= r * r, int(np.ceil(r)))
    return _convolve(img, kernel), {"radius": r}


def _motion_shift(img: np.ndarray, rng: np.random.Generator, *, length: Range
                  ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Linear motion blur: convolution with a centred line segment of a length (pixels) in
    ``length`` at a random angle (a 1 px wide, area-sampled line kernel)."""
    n = float(rng.uniform(*length))
    angle = float(rng.uniform(0.0, 180.0))
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        along, across = x * c + y * s, -x * s + y * c
        return (np.abs(along) <= n / 2) & (np.abs(across) <= 0.5)

    kernel = _supersampled_kernel(inside, int(np.ceil(n / 2)))
    return _convolve(img, kernel), {"length": n, "angle_deg": angle}


def _scale_shift(scene: _Scene, rendered: Rendered, bank: _SourceBank, rng: np.random.Generator,
                 *, zoom: Range) -> Tuple[Rendered, Dict[str, Any]]:
    """The scene re-rendered from the sources, zoomed by a factor in ``zoom`` into a random
    window (labels rasterised at the same view)."""
    z = float(rng.uniform(*zoom))
    w = 1.0 / z
    view: View = (float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - w)), w)
    return scene.render(bank, view), {"zoom": z, "view": list(view)}


#: Every domain shift, by name, in build order. A shift draws its parameters from random
#: stream ``10 + <its position here>``: append new shifts at the end (and bump
#: ``BUILD_VERSION``) so that the existing splits stay as they are.
SHIFT_REGISTRY: Mapping[str, Shift] = MappingProxyType({s.name: s for s in (
    Shift("colour",
          "hue rotation (8-20% of the circle), saturation x0.35-0.6 or x1.5-2, contrast "
          "x0.55-0.75 or x1.3-1.5, per-channel gains 0.8-1.2, brightness +-20",
          _on_pixels(partial(_colour_shift, hue=(0.08, 0.2), saturation=((0.35, 0.6), (1.5, 2.0)),
                             contrast=((0.55, 0.75), (1.3, 1.5)), gains=(0.8, 1.2), brightness=20))),
    Shift("blur", "Gaussian blur, radius 1.2-2.0 px",
          _on_pixels(partial(_blur_shift, radius=(1.2, 2.0)))),
    Shift("noise", "additive Gaussian noise, sigma 12-20 (of 255) per pixel and channel",
          _on_pixels(partial(_noise_shift, sigma=(12, 20)))),
    Shift("scale",
          "zoom x1.5-2.0 into a random window of the validation scene, re-rendered from the "
          "sources (labels rasterised at the same view)",
          partial(_scale_shift, zoom=(1.5, 2.0))),
    # --- evaluation-only shifts (added in build version 2) ---
    Shift("jpeg", "JPEG re-encoding (Pillow) at quality 8-20, decoded back",
          _on_pixels(partial(_jpeg_shift, quality=(8, 20)))),
    Shift("gamma", "gamma 0.45-0.65 or 1.6-2.2 (even odds) on [0, 1] intensities",
          _on_pixels(partial(_gamma_shift, gamma=((0.45, 0.65), (1.6, 2.2))))),
    Shift("defocus", "defocus: pillbox (disk) kernel of radius 1.5-2.5 px",
          _on_pixels(partial(_defocus_shift, radius=(1.5, 2.5)))),
    Shift("motion", "linear motion blur: line kernel of length 5-9 px at a random angle",
          _on_pixels(partial(_motion_shift, length=(5.0, 9.0)))),
)})

#: Domain shifts applied to the validation scenes; each gives a split ``val_<shift>``.
SHIFTS: Tuple[str, ...] = tuple(SHIFT_REGISTRY)
#: Every split written for each dataset, in build order.
SPLITS: Tuple[str, ...] = ("train", "val") + tuple(s.split for s in SHIFT_REGISTRY.values())
