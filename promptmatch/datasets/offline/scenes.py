"""Scenes: the layout of one generated image (which source crop fills which label region).

A scene maker draws a scene from a random generator; :meth:`_Scene.render` (in
:mod:`.canvas`) rasterises the image and its labels at any view, so that the zoomed
``val_scale`` split re-renders the same scene from the sources instead of upsampling pixels.
:data:`_SCENE_MAKERS` maps every ``OfflineDatasetSpec.kind`` to its maker: the ones here and
those of :mod:`.scenes_extra` (``bands``, ``scales``).
"""
from __future__ import annotations

import bisect
from typing import Callable, Mapping, Tuple

import numpy as np

from .canvas import (  # noqa: F401  (Rendered, View: re-exported for .shifts and callers)
    Rendered,
    SceneMaker,
    View,
    _random_shape,
    _sample_box,
    _Scene,
    _shape_mask,
)
from .scenes_extra import _bands_scene, _scales_scene
from .sources import _SOURCES
from .specs import IMAGE_SIZE, OfflineDatasetSpec


def _mosaic_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                  areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    """Blobby Voronoi regions (``layout["regions"]``, default 3-5, seeds at least
    ``layout["min_seed_distance"]`` apart, default 0.28), each a crop of its class's source.
    Region classes: distinct, the first cycling through all classes; or, with
    ``spec.class_weights``, drawn independently from those weights."""
    c = spec.num_classes
    lo, hi = spec.layout.get("regions", (3, 5))
    k = int(rng.integers(lo, hi + 1))
    if spec.class_weights is None:
        # the first region's class cycles through all classes: every class in every split
        others = [i for i in range(c) if i != index % c]
        classes = [index % c] + [others[j] for j in rng.permutation(len(others))[: k - 1]]
    else:
        # each region's class drawn independently (regions may share a class, and then
        # show the same crop): pixel shares follow the weights
        p = np.asarray(spec.class_weights, np.float64)
        classes = [int(x) for x in rng.choice(c, size=k, p=p / p.sum())]
    cells = _voronoi_cells(rng, k, spec.layout.get("min_seed_distance", 0.28))
    cls_arr = np.asarray(classes)

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return cls_arr[cells(u, v)]

    layers = []
    for cls in dict.fromkeys(classes):
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry)


def _voronoi_cells(rng: np.random.Generator, k: int, min_dist: float = 0.28
                   ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``k`` blobby Voronoi cells: seeds at least ``min_dist`` apart (when 200 tries allow),
    distances weighted and perturbed by smooth sinusoids; returns ``(u, v) -> cell index``."""
    seeds = rng.uniform(0.05, 0.95, (1, 2))
    for _ in range(200):
        if len(seeds) == k:
            break
        p = rng.uniform(0.05, 0.95, (1, 2))
        if np.min(np.hypot(*(seeds - p).T)) > min_dist:
            seeds = np.concatenate([seeds, p])
    while len(seeds) < k:  # pragma: no cover - 200 tries suffice for the counts and distances used
        seeds = np.concatenate([seeds, rng.uniform(0.05, 0.95, (1, 2))])
    weights = rng.uniform(0.85, 1.2, k)
    m = 3
    freq = rng.uniform(1.5, 4.0, (k, m))
    ang = rng.uniform(0, 2 * np.pi, (k, m))
    phase = rng.uniform(0, 2 * np.pi, (k, m))
    amp = rng.uniform(0.02, 0.06, (k, m))

    def cells(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d = np.empty((k,) + u.shape)
        for i in range(k):
            d[i] = np.hypot(u - seeds[i, 0], v - seeds[i, 1]) * weights[i]
            for j in range(m):
                d[i] += amp[i, j] * np.sin(2 * np.pi * freq[i, j] * (
                    np.cos(ang[i, j]) * u + np.sin(ang[i, j]) * v) + phase[i, j])
        return np.argmin(d, axis=0)

    return cells


def _collage_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                   areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    c = spec.num_classes
    background = index % c
    n_shapes = int(rng.integers(2, 4))
    others = [i for i in range(c) if i != background]
    shape_classes = [others[j] for j in rng.permutation(len(others))[:n_shapes]]
    shapes = []
    for cls in shape_classes:
        kind = ("ellipse", "polygon", "blob")[int(rng.integers(0, 3))]
        center = rng.uniform(0.15, 0.85, 2)
        r = float(rng.uniform(0.18, 0.36))
        shapes.append(_random_shape(rng, kind, cls, center, r))

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        label = np.full(u.shape, background, np.int64)
        for sh in shapes:
            label[_shape_mask(sh, u, v)] = sh["class"]
        return label

    layers = []
    for cls in [background] + shape_classes:
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry)


def _tiles_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                 areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    key = spec.sources[0]
    box = _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)
    post = (int(rng.integers(0, 4)), int(rng.integers(0, 2)))
    return _Scene(spec, [(-1, key, box)], None, post)  # type: ignore[arg-type]


def _clutter_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                   areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    """Small objects over a cluttered patchwork background.

    The background is ``layout["background_cells"]`` blobby Voronoi cells, each a crop of a
    source drawn from ``spec.background_sources`` (all class 0). Over it,
    ``layout["objects"]`` ellipses, polygons or blobs of size ``layout["object_radius"]``
    (canvas units) centred in ``layout["object_centre"]`` (beyond the canvas: cut by the
    border), each its own crop of the source of its class (1 ..); later objects cover
    earlier ones. The first object's class cycles through the object classes.
    """
    lay = spec.layout
    c = spec.num_classes
    n_cells = int(rng.integers(lay["background_cells"][0], lay["background_cells"][1] + 1))
    cells = _voronoi_cells(rng, n_cells, min_dist=0.22)
    bg = spec.background_sources
    bg_keys = [bg[int(j)] for j in rng.integers(0, len(bg), n_cells)]
    n_obj = int(rng.integers(lay["objects"][0], lay["objects"][1] + 1))
    obj_classes = [1 + index % (c - 1)] + [int(x) for x in rng.integers(1, c, n_obj - 1)]
    shapes = []
    for cls in obj_classes:
        kind = ("ellipse", "polygon", "blob")[int(rng.integers(0, 3))]
        center = rng.uniform(*lay["object_centre"], 2)
        r = float(rng.uniform(*lay["object_radius"]))
        shapes.append(_random_shape(rng, kind, cls, center, r))

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = cells(u, v)  # background layers 0 .. n_cells - 1
        for i, sh in enumerate(shapes):
            out[_shape_mask(sh, u, v)] = n_cells + i
        return out

    layers = [(0, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)) for key in bg_keys]
    for cls in obj_classes:
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry, layered=True)


def _polyline_mask(pts: np.ndarray, half_width: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies within the half width (linearly interpolated along each
    segment) of the polyline ``pts`` (canvas units): an exact, unaliased thick line.

    ``u``/``v`` must be a grid as :func:`_canvas_grid` makes (``u`` increasing along columns,
    ``v`` along rows): each segment is evaluated only on the block of pixels around it.
    """
    xs, ys = u[0].tolist(), v[:, 0].tolist()  # (bisect on lists: much faster than searchsorted here)
    mask = np.zeros(u.shape, bool)
    for i in range(len(pts) - 1):
        (x0, y0), (x1, y1) = pts[i].tolist(), pts[i + 1].tolist()
        h0, h1 = float(half_width[i]), float(half_width[i + 1])
        h = max(h0, h1)
        c0, c1 = bisect.bisect_left(xs, min(x0, x1) - h), bisect.bisect_right(xs, max(x0, x1) + h)
        r0, r1 = bisect.bisect_left(ys, min(y0, y1) - h), bisect.bisect_right(ys, max(y0, y1) + h)
        if c0 >= c1 or r0 >= r1:
            continue
        uu, vv = u[r0:r1, c0:c1], v[r0:r1, c0:c1]
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = np.clip(((uu - x0) * dx + (vv - y0) * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0 * uu
        d2 = (uu - x0 - t * dx) ** 2 + (vv - y0 - t * dy) ** 2
        w = h0 + t * (h1 - h0)
        mask[r0:r1, c0:c1] |= d2 <= w * w
    return mask


def _random_curve(rng: np.random.Generator, length: Tuple[float, float], width_px: Tuple[float, float],
                  segments: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """A smooth random curve (cubic Bezier, chord length in ``length`` canvas units, centre
    inside the canvas) tapering from one width in ``width_px`` (pixels at
    :data:`IMAGE_SIZE`) to a smaller one: ``(points, half widths)`` of its polyline."""
    centre = rng.uniform(0.1, 0.9, 2)
    theta = rng.uniform(0, 2 * np.pi)
    chord = float(rng.uniform(*length))
    d = np.array([np.cos(theta), np.sin(theta)])
    nrm = np.array([-d[1], d[0]])
    p0, p3 = centre - 0.5 * chord * d, centre + 0.5 * chord * d
    bend = rng.uniform(-0.45, 0.45, 2) * chord
    p1 = p0 + chord / 3 * d + bend[0] * nrm
    p2 = p0 + 2 * chord / 3 * d + bend[1] * nrm
    w0 = float(rng.uniform(*width_px))
    w1 = float(rng.uniform(width_px[0], w0))
    t = np.linspace(0.0, 1.0, segments + 1)[:, None]
    pts = ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3)
    return pts, (w0 + (w1 - w0) * t[:, 0]) / (2 * IMAGE_SIZE)


def _random_wire(rng: np.random.Generator, length: Tuple[float, float], width_px: Tuple[float, float]
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """A straight-ish polyline: 2-3 segments of total length in ``length`` (canvas units),
    turning by at most 8 degrees at each joint, one width in ``width_px`` (pixels at
    :data:`IMAGE_SIZE`): ``(points, half widths)``."""
    centre = rng.uniform(0.05, 0.95, 2)
    theta = rng.uniform(0, 2 * np.pi)
    total = float(rng.uniform(*length))
    n_seg = int(rng.integers(2, 4))
    turns = np.concatenate([[0.0], np.cumsum(np.deg2rad(rng.uniform(-8, 8, n_seg - 1)))])
    steps = total / n_seg * np.stack([np.cos(theta + turns), np.sin(theta + turns)], axis=1)
    pts = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    pts += centre - pts.mean(axis=0)
    w = float(rng.uniform(*width_px))
    return pts, np.full(len(pts), w / (2 * IMAGE_SIZE))


def _thin_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    """Thin curvilinear structures over a photo.

    Class 0 (background) is one crop of a source of ``spec.background_sources`` (cycling
    with the index); class 1 is ``layout["vessels"]`` smooth tapering curves
    (:func:`_random_curve`), class 2 ``layout["wires"]`` straight-ish polylines
    (:func:`_random_wire`) drawn over them; every structure is its own crop of its class's
    source. Labels are exact: a pixel is a structure iff its centre is within the half width.
    """
    lay = spec.layout
    bg = spec.background_sources
    bg_key = bg[index % len(bg)]
    n_vessels = int(rng.integers(lay["vessels"][0], lay["vessels"][1] + 1))
    n_wires = int(rng.integers(lay["wires"][0], lay["wires"][1] + 1))
    structures = [(1,) + _random_curve(rng, lay["vessel_length"], lay["vessel_width_px"])
                  for _ in range(n_vessels)]
    structures += [(2,) + _random_wire(rng, lay["wire_length"], lay["wire_width_px"])
                   for _ in range(n_wires)]

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros(u.shape, np.int64)
        for i, (_, pts, hw) in enumerate(structures):
            out[_polyline_mask(pts, hw, u, v)] = 1 + i
        return out

    layers = [(0, bg_key, _sample_box(rng, _SOURCES[bg_key], areas[bg_key], spec.crop_px))]
    for cls, _, _ in structures:
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry, layered=True)


_SCENE_MAKERS: Mapping[str, SceneMaker] = {"mosaic": _mosaic_scene, "collage": _collage_scene, "tiles": _tiles_scene,
                                           "clutter": _clutter_scene, "thin": _thin_scene,
                                           "bands": _bands_scene, "scales": _scales_scene}
