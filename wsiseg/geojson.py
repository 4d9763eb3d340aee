"""QuPath-readable GeoJSON: per-class polygons of a label map and the TSR hot-spot circle.

Import in QuPath (0.4 or later): open the slide, then File > Import objects (or drag the
.geojson file onto the viewer). Each class becomes one annotation (a MultiPolygon, holes
kept) with the class's name and colour; the hot-spot field is a separate polygon annotation
(QuPath imports polygons; a 72-gon is a circle to within 0.1 % of its radius).

Coordinates are level-0 pixels of the slide, GeoJSON order ``[x, y]`` (x = column to the
right, y = row downwards), converted from map pixels as ``x = offset_x + col_edge * scale``
where ``col_edge`` counts pixel edges (pixel j spans [j, j+1)) and ``scale`` is slide level-0
pixels per map pixel. Rings are closed, have at least 4 positions, and have positive
shoelace area in (x, y) for exterior rings and negative for holes: the RFC 7946 right-hand
rule (counter-clockwise exteriors with y up; on screen, where y points down, they turn
clockwise). QuPath accepts either orientation.

Contours follow pixel edges at half-pixel precision (marching squares at level 0.5) and are
simplified with Douglas-Peucker (``tolerance_um``). Simplification can, rarely, make a ring
touch itself; that is not checked here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from skimage.measure import find_contours, label, regionprops

from .files import write_text_atomic
from .labels import check_labels, check_mpp, count_values
from .report import HOTSPOT, hotspot_name

Ring = list[list[float]]
_PIECE = 200  # points per independently simplified piece of a long contour


def _shoelace(ring_rc: np.ndarray) -> float:
    """Signed area of a closed ring given as (row, col): positive when counter-clockwise
    in (x=col, y=row) terms, i.e. the same sign as the shoelace sum over (x, y)."""
    y, x = ring_rc[:, 0], ring_rc[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def simplify_ring(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a polyline or closed ring (first point == last).

    Points where the direction does not change are dropped first (marching-squares contours
    have one point per pixel edge); for a closed ring the first split is at the point
    farthest from the start. Long lines are cut into pieces of ``_PIECE`` points simplified
    on their own, which bounds the cost on wiggly contours at the price of one extra vertex
    per piece.
    """
    d = np.diff(points, axis=0)
    turns = np.abs(d[1:, 0] * d[:-1, 1] - d[1:, 1] * d[:-1, 0]) > 1e-12
    p = points[np.r_[True, turns, True]]
    keep = np.zeros(len(p), bool)
    ends = list(range(0, len(p) - 1, _PIECE)) + [len(p) - 1]
    keep[ends] = True
    stack = list(zip(ends[:-1], ends[1:]))
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        rel, chord = p[i + 1:j] - p[i], p[j] - p[i]
        length = math.hypot(chord[0], chord[1])
        dist = (np.hypot(rel[:, 0], rel[:, 1]) if length == 0
                else np.abs(chord[0] * rel[:, 1] - chord[1] * rel[:, 0]) / length)
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return p[keep]


def _to_ring(contour_rc: np.ndarray, *, exterior: bool, tolerance_px: float,
             origin_rc: tuple[float, float], scale: float,
             offset_xy: tuple[float, float]) -> Ring | None:
    ring = simplify_ring(contour_rc, tolerance_px)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    if len(ring) < 4 or _shoelace(ring) == 0:
        return None
    if (_shoelace(ring) > 0) != exterior:
        ring = ring[::-1]
    x = offset_xy[0] + (ring[:, 1] + origin_rc[1]) * scale
    y = offset_xy[1] + (ring[:, 0] + origin_rc[0]) * scale
    return [[round(float(a), 2), round(float(b), 2)] for a, b in zip(x, y)]


def mask_polygons(mask: np.ndarray, *, mpp: float, scale: float = 1.0,
                  offset_xy: tuple[float, float] = (0.0, 0.0), tolerance_um: float | None = None,
                  min_area_um2: float = 0.0) -> list[list[Ring]]:
    """Polygons ``[exterior, hole, ...]`` of the 8-connected components of a boolean mask.

    Components with fewer than ``min_area_um2`` of pixels are dropped, and holes smaller than
    that are filled. ``tolerance_um`` defaults to half a map pixel, which removes the
    pixel staircase but no shape.
    """
    mpp = check_mpp(mpp)
    tolerance_px = 0.5 if tolerance_um is None else tolerance_um / mpp
    min_area_px = min_area_um2 / (mpp * mpp)
    polygons = []
    for region in regionprops(label(mask, connectivity=2)):
        if region.area < min_area_px:
            continue
        crop = np.pad(region.image, 1).astype(np.uint8)
        # 'high': the component is 8-connected, its holes 4-connected, as in the labelling,
        # so there is exactly one exterior contour; holes have the opposite orientation.
        contours = [np.asarray(c) for c in find_contours(crop, 0.5, fully_connected="high")]
        areas = [abs(_shoelace(c)) for c in contours]
        outer = int(np.argmax(areas))
        # crop pixel (i, j) is map pixel (min_row - 1 + i, ...); +0.5 moves centres to edges
        origin = (region.bbox[0] - 0.5, region.bbox[1] - 0.5)
        kw = dict(tolerance_px=tolerance_px, origin_rc=origin, scale=scale, offset_xy=offset_xy)
        exterior = _to_ring(contours[outer], exterior=True, **kw)
        if exterior is None:
            continue
        holes = [_to_ring(c, exterior=False, **kw) for i, c in enumerate(contours)
                 if i != outer and areas[i] >= max(min_area_px, 1e-9)]
        polygons.append([exterior] + [h for h in holes if h is not None])
    return polygons


def class_features(labels: np.ndarray, *, class_names: Sequence[str],
                   colors: Sequence[Sequence[int]], mpp: float, scale: float = 1.0,
                   offset_xy: tuple[float, float] = (0.0, 0.0), skip_values: Sequence[int] = (),
                   tolerance_um: float | None = None,
                   min_area_um2: float = 1000.0) -> list[dict[str, Any]]:
    """One QuPath annotation feature per class present (value k+1 = ``class_names[k]``).

    ``mpp`` is the map's resolution (for the tolerance and the minimum area), ``scale`` the
    slide level-0 pixels per map pixel and ``offset_xy`` the slide pixel of the map's top-left
    corner. Value 0 and ``skip_values`` (e.g. background) are not exported. The default
    ``min_area_um2`` (a 32 x 32 um square) drops single-pixel specks of a 16 um map.
    """
    labels = check_labels(labels)
    if len(colors) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
    present = np.flatnonzero(count_values(labels, len(class_names) + 1))
    features = []
    for value in present:
        if value == 0 or value in skip_values or value > len(class_names):
            continue
        polygons = mask_polygons(labels == value, mpp=mpp, scale=scale, offset_xy=offset_xy,
                                 tolerance_um=tolerance_um, min_area_um2=min_area_um2)
        if not polygons:
            continue
        features.append(_feature(
            {"type": "MultiPolygon", "coordinates": polygons},
            name=None, class_name=class_names[value - 1], color=colors[value - 1]))
    return features


def _feature(geometry: dict[str, Any], *, name: str | None, class_name: str,
             color: Sequence[int]) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": "annotation",
                             "classification": {"name": class_name,
                                                "color": [int(c) for c in color]}}
    if name:
        props["name"] = name
    return {"type": "Feature", "geometry": geometry, "properties": props}


def hotspot_feature(hotspot: Any, *, slide_mpp: float, offset_xy: tuple[float, float] = (0.0, 0.0),
                    n_vertices: int = 72, color: Sequence[int] = (0, 0, 0)) -> dict[str, Any]:
    """The TSR hot-spot field (a ``wsiseg.tsr.Hotspot``) as a closed polygon annotation.

    Its centre is in um from the map's top-left corner; ``slide_mpp`` is the slide's level-0
    resolution and ``offset_xy`` the slide pixel of the map's corner.
    """
    slide_mpp = check_mpp(slide_mpp)
    if n_vertices < 3:
        raise ValueError(f"a circle polygon needs at least 3 vertices, got {n_vertices}")
    cx = offset_xy[0] + hotspot.centre_col_um / slide_mpp
    cy = offset_xy[1] + hotspot.centre_row_um / slide_mpp
    r = hotspot.diameter_um / 2 / slide_mpp
    angles = 2 * math.pi * np.arange(n_vertices + 1) / n_vertices
    angles[-1] = 0.0  # close exactly
    ring = [[round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)] for a in angles]
    return _feature({"type": "Polygon", "coordinates": [ring]}, name=hotspot_name(hotspot),
                    class_name=HOTSPOT, color=color)


def feature_collection(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def write_geojson(path: str | os.PathLike[str], features: Sequence[dict[str, Any]]) -> None:
    """Write a FeatureCollection; the file appears complete or not at all."""
    write_text_atomic(path, json.dumps(feature_collection(features), separators=(",", ":")))
