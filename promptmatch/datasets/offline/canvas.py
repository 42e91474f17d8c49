"""The canvas of a scene: views, source crop boxes, shapes, and :class:`_Scene`, which renders
a scene's layout at any view.

Scenes are drawn in canvas units (the image is the unit square, ``u`` to the right, ``v``
down), so that the zoomed ``val_scale`` split re-renders the same scene from the sources
instead of upsampling pixels. The scene makers are in :mod:`.scenes` and :mod:`.scenes_extra`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image

from .sources import _Source, _SourceBank
from .specs import IMAGE_SIZE, OfflineDatasetSpec


View = Tuple[float, float, float]  # (left, top, side) of the rendered window, canvas units
_FULL_VIEW: View = (0.0, 0.0, 1.0)
#: A rendered scene: RGB image, label map and the source crops it was read from.
Rendered = Tuple[np.ndarray, np.ndarray, List[Dict[str, Any]]]
#: Draws the scene ``index`` of a dataset from ``rng``, cropping sources inside ``areas``.
SceneMaker = Callable[[OfflineDatasetSpec, np.random.Generator, int, Mapping[str, Tuple[int, int, int, int]]],
                      "_Scene"]


def _canvas_grid(view: View, n: int) -> Tuple[np.ndarray, np.ndarray]:
    a, b, w = view
    t = (np.arange(n, dtype=np.float64) + 0.5) / n * w
    return np.meshgrid(a + t, b + t)  # u (x, columns), v (y, rows)


def _sample_box(rng: np.random.Generator, src: _Source, area: Tuple[int, int, int, int],
                crop_px: Tuple[int, int]) -> Tuple[float, float, float]:
    side = float(rng.uniform(*crop_px)) * src.scale
    x0, y0, x1, y1 = area
    if side > min(x1 - x0, y1 - y0):
        raise AssertionError(f"crop side {side} does not fit area {area} of {src.key}")
    return float(rng.uniform(x0, x1 - side)), float(rng.uniform(y0, y1 - side)), side


def _view_box(box: Tuple[float, float, float], view: View) -> Tuple[float, float, float, float]:
    x, y, s = box
    a, b, w = view
    return (x + a * s, y + b * s, x + (a + w) * s, y + (b + w) * s)


class _Scene:
    """A scene: per-class source crops plus a label geometry, renderable at any view."""

    def __init__(self, spec: OfflineDatasetSpec, layers: List[Tuple[int, str, Tuple[float, float, float]]],
                 geometry: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 post: Tuple[int, int] = (0, 0), layered: bool = False) -> None:
        self.spec = spec
        self.layers = layers  # (class index, source key, (x, y, side))
        self.geometry = geometry  # (u, v) -> label (layered: -> layer index), or None for tiles
        self.post = post  # (rot90 k, horizontal flip) applied after rendering (tiles)
        # layered: several layers may share a class (each region its own crop); the geometry
        # gives the index into ``layers`` of every pixel and the label is that layer's class
        self.layered = layered

    def render(self, bank: _SourceBank, view: View = _FULL_VIEW, n: int = IMAGE_SIZE) -> Rendered:
        spec = self.spec
        crops = []
        if spec.kind == "tiles":
            cls, key, box = self.layers[0]
            vb = _view_box(box, view)
            img = np.asarray(bank.image(key, spec.colour_mode).resize((n, n), Image.BICUBIC, box=vb))
            label = np.asarray(bank.mask(key).resize((n, n), Image.NEAREST, box=vb)).astype(np.uint8)
            crops.append({"source": key, "box": list(vb)})
        else:
            u, v = _canvas_grid(view, n)
            if self.layered:
                layer_map = self.geometry(u, v)
                label = np.asarray([cls for cls, _, _ in self.layers], np.uint8)[layer_map]
            else:
                label = self.geometry(u, v).astype(np.uint8)
            shape = (n, n) if spec.colour_mode == "gray" else (n, n, 3)
            img = np.zeros(shape, np.uint8)
            for j, (cls, key, box) in enumerate(self.layers):
                vb = _view_box(box, view)
                crops.append({"class": spec.classes[cls], "source": key, "box": list(vb)})
                sel = layer_map == j if self.layered else label == cls
                if sel.any():
                    patch = np.asarray(bank.image(key, spec.colour_mode).resize(
                        (n, n), Image.BICUBIC, box=vb))
                    img[sel] = patch[sel]
        k, flip = self.post
        if k or flip:
            img, label = np.rot90(img, k), np.rot90(label, k)
            if flip:
                img, label = img[:, ::-1], label[:, ::-1]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return np.ascontiguousarray(img), np.ascontiguousarray(label), crops


def _shape_mask(shape: Dict[str, Any], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cx, cy = shape["center"]
    du, dv = u - cx, v - cy
    if shape["type"] == "ellipse":
        ct, st = np.cos(shape["angle"]), np.sin(shape["angle"])
        x, y = ct * du + st * dv, -st * du + ct * dv
        return (x / shape["rx"]) ** 2 + (y / shape["ry"]) ** 2 <= 1.0
    if shape["type"] == "polygon":
        pts = shape["vertices"]
        inside = np.ones(u.shape, bool)
        for i in range(len(pts)):
            (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % len(pts)]
            inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
        return inside
    phi = np.arctan2(dv, du)
    r = shape["r"] * (1 + sum(a * np.sin(h * phi + p) for h, a, p in shape["harmonics"]))
    return np.hypot(du, dv) <= r


def _random_shape(rng: np.random.Generator, kind: str, cls: int, center: np.ndarray, r: float
                  ) -> Dict[str, Any]:
    """A random ``"ellipse"``, convex ``"polygon"`` or ``"blob"`` (perturbed radius) of size
    about ``r`` around ``center`` (canvas units), for :func:`_shape_mask`."""
    shape: Dict[str, Any] = {"type": kind, "class": cls, "center": center}
    if kind == "ellipse":
        shape.update(rx=r * rng.uniform(0.7, 1.3), ry=r * rng.uniform(0.7, 1.3),
                     angle=rng.uniform(0, np.pi))
    elif kind == "polygon":
        nv = int(rng.integers(3, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, nv))
        rx, ry, rot = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25), rng.uniform(0, np.pi)
        px, py = rx * np.cos(t), ry * np.sin(t)  # counter-clockwise (in u, v) on an ellipse
        ct, st = np.cos(rot), np.sin(rot)
        shape["vertices"] = [(center[0] + ct * x - st * y, center[1] + st * x + ct * y)
                             for x, y in zip(px, py)]
        if _polygon_area(shape["vertices"]) < 0.2 * np.pi * rx * ry:
            # degenerate sliver: fall back to the ellipse through the same radii
            shape.update(type="ellipse", rx=rx, ry=ry, angle=rot)
    else:
        shape["r"] = r
        shape["harmonics"] = [(h, rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi))
                              for h in (2, 3, 4)]
    return shape


def _polygon_area(pts: Sequence[Tuple[float, float]]) -> float:
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
