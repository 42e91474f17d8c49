"""Scene makers of the held-out datasets added for SPM v4: ``bands`` (wavy texture bands,
``texture_bands``) and ``scales`` (objects of very different sizes on a photo,
``scale_objects``). Registered in :data:`.scenes._SCENE_MAKERS`; the canvas primitives they
draw with are in :mod:`.canvas`.
"""
from __future__ import annotations

from typing import List, Mapping, Tuple

import numpy as np

from .canvas import _random_shape, _sample_box, _Scene, _shape_mask
from .sources import _SOURCES
from .specs import IMAGE_SIZE, OfflineDatasetSpec

__all__: List[str] = []


def _bands_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                 areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    """Wavy, roughly parallel bands of random widths, each a crop of its class's source.

    With a random direction ``theta``, ``s = u cos(theta) + v sin(theta)`` runs across the
    bands and ``t = -u sin(theta) + v cos(theta)`` along them. The band edges are level sets of
    ``w = s + sum_j a_j sin(2 pi f_j t + b_j s + p_j)`` (``layout["waves"]`` terms; amplitude
    ``a_j`` in ``layout["wave_amplitude"]`` canvas units, ``f_j`` in
    ``layout["wave_frequency"]`` cycles per canvas side, phase drift ``b_j`` in
    ``layout["wave_drift"]`` radians per canvas unit across the bands, so that neighbouring
    edges are not exactly parallel). ``sum_j a_j |b_j| < 1`` keeps ``w`` increasing with ``s``:
    edges never cross. Successive edges are ``layout["band_width_px"]`` apart in ``w``
    (pixels at :data:`IMAGE_SIZE`, drawn log-uniformly). The band through the canvas centre
    has class ``index % C`` (every class in every split); going outwards, each band's class
    is drawn from the classes other than its inner neighbour's, so adjacent bands always
    differ. Each class present is one crop of its source (shared by its bands).
    """
    lay = spec.layout
    c = spec.num_classes
    theta = float(rng.uniform(0, 2 * np.pi))
    ct, st = np.cos(theta), np.sin(theta)
    m = int(lay["waves"])
    amp = rng.uniform(*lay["wave_amplitude"], m)
    freq = rng.uniform(*lay["wave_frequency"], m)
    drift = rng.uniform(*lay["wave_drift"], m)
    phase = rng.uniform(0, 2 * np.pi, m)
    assert float(np.sum(amp * np.abs(drift))) < 1.0, "band edges could cross"

    def warped(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        s, t = ct * u + st * v, -st * u + ct * v
        w = s.copy()
        for j in range(m):
            w += amp[j] * np.sin(2 * np.pi * freq[j] * t + drift[j] * s + phase[j])
        return w

    corners = [ct * x + st * y for x in (0.0, 1.0) for y in (0.0, 1.0)]
    margin = float(amp.sum())
    lo_px, hi_px = lay["band_width_px"]
    log_w = (np.log(lo_px / IMAGE_SIZE), np.log(hi_px / IMAGE_SIZE))
    edges = [min(corners) - margin - float(rng.uniform(0, hi_px / IMAGE_SIZE))]
    while edges[-1] < max(corners) + margin:
        edges.append(edges[-1] + float(np.exp(rng.uniform(*log_w))))
    edge_arr = np.asarray(edges[1:-1])  # band k lies between edges[k] and edges[k + 1]
    n_bands = len(edges) - 1
    centre = int(np.searchsorted(edge_arr, warped(np.array([0.5]), np.array([0.5])))[0])
    classes = [0] * n_bands
    classes[centre] = index % c
    for k in list(range(centre + 1, n_bands)) + list(range(centre - 1, -1, -1)):
        inner = classes[k - 1] if k > centre else classes[k + 1]
        classes[k] = [x for x in range(c) if x != inner][int(rng.integers(0, c - 1))]
    cls_arr = np.asarray(classes)

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return cls_arr[np.searchsorted(edge_arr, warped(u, v))]

    layers = []
    for cls in dict.fromkeys(classes):
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry)


def _scales_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                  areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    """Objects of very different sizes over one photo.

    Class 0 (background) is one crop of ``spec.background_sources[layout["background_cycle"]
    [index % len(cycle)]]``. Over it, ``layout["objects"]`` ellipses, polygons or blobs
    (:func:`_random_shape`) with a radius drawn log-uniformly from ``layout["object_radius"]``
    (canvas units) and a centre in ``layout["object_centre"]``, drawn largest first (smaller
    objects cover larger ones); each is its own crop of the source of its class (1 ..). The
    first object drawn from the generator has class ``1 + index % (C - 1)``, the others
    are uniform over the object classes.
    """
    lay = spec.layout
    c = spec.num_classes
    cycle = lay["background_cycle"]
    bg_key = spec.background_sources[cycle[index % len(cycle)]]
    n_obj = int(rng.integers(lay["objects"][0], lay["objects"][1] + 1))
    obj_classes = [1 + index % (c - 1)] + [int(x) for x in rng.integers(1, c, n_obj - 1)]
    radii = np.exp(rng.uniform(*np.log(lay["object_radius"]), n_obj))
    shapes = []
    for cls, r in zip(obj_classes, radii):
        kind = ("ellipse", "polygon", "blob")[int(rng.integers(0, 3))]
        center = rng.uniform(*lay["object_centre"], 2)
        shapes.append(_random_shape(rng, kind, cls, center, float(r)))
    shapes = [shapes[i] for i in np.argsort(-radii, kind="stable")]  # largest first

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros(u.shape, np.int64)  # layer 0: the background
        for i, sh in enumerate(shapes):
            out[_shape_mask(sh, u, v)] = 1 + i
        return out

    layers = [(0, bg_key, _sample_box(rng, _SOURCES[bg_key], areas[bg_key], spec.crop_px))]
    for sh in shapes:
        key = spec.sources[sh["class"]]
        layers.append((sh["class"], key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry, layered=True)
