"""Polygon annotations (QuPath GeoJSON, ASAP XML) rasterised into label maps.

Coordinates in both formats are level-0 slide pixels (x, y). A label map is rasterised at the
model's mpp: ``scale = slide_mpp / model_mpp`` model pixels per level-0 pixel. Unannotated pixels
are 0. Polygons are drawn from the largest to the smallest, so an annotation inside another one
wins; holes (GeoJSON interior rings, ASAP groups mapped to ``None``) are cleared to 0.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon


class AnnotationError(ValueError):
    """An annotation file cannot be used as it is."""


@dataclass(frozen=True)
class Polygon:
    name: str                                  # annotation class as written in the file
    exterior: np.ndarray                       # [K, 2] x, y in level-0 pixels
    holes: tuple[np.ndarray, ...] = ()


def _geojson_class(props: Mapping) -> str | None:
    c = props.get("classification")
    if isinstance(c, Mapping):
        return c.get("name")
    if isinstance(c, str):
        return c
    return props.get("name") or props.get("class")


def read_geojson(path: str | Path) -> list[Polygon]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, list of features or one feature)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read GeoJSON ({e})") from None
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, list):
        features = data
    else:
        features = [data]
    out: list[Polygon] = []
    for i, f in enumerate(features):
        geom = f.get("geometry") or {}
        name = _geojson_class(f.get("properties") or {})
        if name is None:
            raise AnnotationError(f"{path}: feature {i} has no classification; give every "
                                  "annotation a class in QuPath before exporting")
        if geom.get("type") == "Polygon":
            rings_list = [geom["coordinates"]]
        elif geom.get("type") == "MultiPolygon":
            rings_list = geom["coordinates"]
        else:
            continue  # points and lines carry no area
        for rings in rings_list:
            arrs = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
            out.append(Polygon(name, arrs[0], tuple(arrs[1:])))
    return out


def read_asap(path: str | Path) -> list[Polygon]:
    """Polygons of an ASAP XML file; the class is the annotation's ``PartOfGroup``."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise AnnotationError(f"{path}: cannot read ASAP XML ({e})") from None
    out: list[Polygon] = []
    for i, a in enumerate(root.iter("Annotation")):
        if a.get("Type", "Polygon") not in ("Polygon", "Spline", "Rectangle"):
            continue
        coords = sorted(a.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        if len(coords) < 3:
            raise AnnotationError(f"{path}: annotation {a.get('Name', i)!r} has fewer than 3 "
                                  "coordinates")
        xy = np.array([[float(c.get("X").replace(",", ".")), float(c.get("Y").replace(",", "."))]
                       for c in coords])
        out.append(Polygon(a.get("PartOfGroup") or a.get("Name") or "", xy))
    return out


def read_annotations(path: str | Path) -> list[Polygon]:
    suffix = Path(path).suffix.lower()
    if suffix in (".geojson", ".json"):
        return read_geojson(path)
    if suffix == ".xml":
        return read_asap(path)
    raise AnnotationError(f"{path}: unknown annotation format {suffix!r}; use QuPath GeoJSON "
                          "(.geojson/.json) or ASAP XML (.xml)")


def _area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def rasterize(polygons: list[Polygon], class_map: Mapping[str, int | None],
              l0_size: tuple[int, int], scale: float, *, source: str = "annotations") -> np.ndarray:
    """Label map (uint8, rows x cols at the model mpp) of polygons in level-0 (x, y) pixels.

    ``class_map`` maps an annotation class (case-insensitive) to a label value, or to ``None``
    for exclusion groups that clear what is below them. ``l0_size`` is the slide's (w, h).
    """
    lookup = {k.lower(): v for k, v in class_map.items()}
    l0_w, l0_h = l0_size
    shape = (max(1, int(round(l0_h * scale))), max(1, int(round(l0_w * scale))))
    labels = np.zeros(shape, dtype=np.uint8)
    tol = 1.0  # level-0 pixels: vertices on the slide's edge are fine
    for p in sorted(polygons, key=lambda p: -_area(p.exterior)):
        if p.name.lower() not in lookup:
            raise AnnotationError(f"{source}: annotation class {p.name!r} is not in the class "
                                  f"map {sorted(class_map)}; add it to class_map in the config "
                                  "(map it to a class, or to \"\" to ignore it)")
        x, y = p.exterior[:, 0], p.exterior[:, 1]
        if x.min() < -tol or y.min() < -tol or x.max() > l0_w + tol or y.max() > l0_h + tol:
            raise AnnotationError(
                f"{source}: a {p.name!r} annotation spans x {x.min():.0f}..{x.max():.0f}, "
                f"y {y.min():.0f}..{y.max():.0f}, outside the slide ({l0_w}x{l0_h} px at level 0); "
                "check that the annotation belongs to this slide")
        value = lookup[p.name.lower()]
        inside = np.zeros(shape, dtype=bool)
        rr, cc = draw_polygon(y * scale, x * scale, shape)
        inside[rr, cc] = True
        for hole in p.holes:
            rr, cc = draw_polygon(hole[:, 1] * scale, hole[:, 0] * scale, shape)
            inside[rr, cc] = False
        labels[inside] = value or 0
    return labels
