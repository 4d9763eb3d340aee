"""Polygon annotations (QuPath GeoJSON, ASAP XML) rasterised into label maps.

Coordinates in both formats are level-0 slide pixels (x, y). A label map is rasterised at the
model's mpp: ``scale = slide_mpp / model_mpp`` model pixels per level-0 pixel. Unannotated pixels
are 0. Polygons are drawn from the largest to the smallest, so an annotation inside another one
wins; holes (GeoJSON interior rings, ASAP groups mapped to ``None``) are cleared to 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

import numpy as np
from skimage.draw import polygon as draw_polygon

# Annotation files come from elsewhere: read them as data within limits. A file over
# MAX_FILE_BYTES or with more than MAX_VERTICES polygon points is refused before it is parsed
# (GeoJSON) or rasterised (both).
MAX_FILE_BYTES = 100 * 2**20
MAX_VERTICES = 10_000_000


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


def _read_limited(path: str | Path, kind: str) -> bytes:
    """The bytes of an annotation file no larger than MAX_FILE_BYTES."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AnnotationError(
                f"{path}: {size:,} bytes, over the limit of {MAX_FILE_BYTES:,} for {kind} "
                "annotations; split it into several files or simplify the polygons")
        return path.read_bytes()
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read {kind} ({e})") from None


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _geojson_ring(ring: object, where: str) -> np.ndarray:
    """[K, 2] float64 of a GeoJSON ring: at least 3 points of 2 (or 3) finite numbers each."""
    fix = "fix or delete this annotation and export it again"
    if not isinstance(ring, list):
        raise AnnotationError(f"{where}: a ring is {_short(ring)}, not a list of [x, y] points; "
                              f"{fix}")
    for k, p in enumerate(ring):
        if not (isinstance(p, list) and len(p) in (2, 3)
                and all(type(v) in (int, float) for v in p)):
            raise AnnotationError(f"{where}: point {k} of a ring is {_short(p)}, not an [x, y] "
                                  f"pair of numbers; {fix}")
    if len(ring) < 3:
        raise AnnotationError(f"{where}: a ring has {len(ring)} points, fewer than 3; {fix}")
    try:
        xy = np.array([p[:2] for p in ring], dtype=np.float64)
    except OverflowError:
        xy = np.array([[np.inf, np.inf]])
    if not np.isfinite(xy).all():
        raise AnnotationError(f"{where}: a ring has a coordinate that is not a finite number "
                              f"(NaN, infinity or huge); {fix}")
    return xy


def _geojson_polygons(feature: object, i: int, path: str | Path) -> list[Polygon]:
    """The polygons of feature ``i`` (none for points and lines)."""
    if not isinstance(feature, Mapping):
        raise AnnotationError(f"{path}: feature {i} is {_short(feature)}, not a GeoJSON Feature "
                              "object; export the annotations from QuPath again")
    geom = feature.get("geometry") or {}
    props = feature.get("properties") or {}
    name = _geojson_class(props) if isinstance(props, Mapping) else None
    if name is None:
        raise AnnotationError(f"{path}: feature {i} has no classification; give every "
                              "annotation a class in QuPath before exporting")
    if not isinstance(name, str) or not isinstance(geom, Mapping):
        raise AnnotationError(f"{path}: feature {i} has a class or geometry that is not "
                              "GeoJSON; export the annotations from QuPath again")
    where = f"{path}: feature {i} ({name!r})"
    kind = geom.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        return []  # points and lines carry no area
    coords = geom.get("coordinates")
    polygons = [coords] if kind == "Polygon" else coords
    if not isinstance(polygons, list) or not polygons or \
            not all(isinstance(rings, list) and rings for rings in polygons):
        raise AnnotationError(f"{where}: {kind} has no list of rings under \"coordinates\"; "
                              "fix or delete this annotation and export it again")
    out = []
    for rings in polygons:
        arrs = [_geojson_ring(r, where) for r in rings]
        out.append(Polygon(name, arrs[0], tuple(arrs[1:])))
    return out


def _n_points(polygons: list[Polygon], path: str | Path, before: int = 0) -> int:
    """Points in ``polygons`` plus ``before``; AnnotationError above MAX_VERTICES."""
    n = before + sum(len(p.exterior) + sum(len(h) for h in p.holes) for p in polygons)
    if n > MAX_VERTICES:
        raise AnnotationError(f"{path}: more than {MAX_VERTICES:,} polygon points, the limit; "
                              "split the file or simplify the polygons")
    return n


def read_geojson(path: str | Path) -> list[Polygon]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, list of features or one feature)."""
    try:
        data = json.loads(_read_limited(path, "GeoJSON"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read GeoJSON ({e})") from None
    except RecursionError:
        raise AnnotationError(f"{path}: GeoJSON nested too deeply to be annotations; export the "
                              "annotations from QuPath again") from None
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, list):
        features = data
    else:
        features = [data]
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: \"features\" is {_short(features)}, not a list of "
                              "features; export the annotations from QuPath again")
    out: list[Polygon] = []
    n = 0
    for i, f in enumerate(features):
        polygons = _geojson_polygons(f, i, path)
        n = _n_points(polygons, path, n)
        out += polygons
    return out


_NUMBER = re.compile(r"[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?")


def _asap_number(attrs: Mapping[str, str], key: str, k: int, where: str) -> float:
    value = attrs.get(key)
    fix = "fix the coordinate or delete the annotation"
    if value is None:
        raise AnnotationError(f"{where}: coordinate {k} has no {key}; {fix}")
    if not _NUMBER.fullmatch(value.strip()):
        raise AnnotationError(f"{where}: coordinate {k} has {key}={value[:40]!r}, not a finite "
                              f"number; {fix}")
    return float(value.strip().replace(",", "."))


def _asap_elements(data: bytes, path: str | Path) -> list[tuple[dict, list[dict]]]:
    """(attributes, coordinate attributes) of every Annotation element, read with expat.

    ASAP XML has no DTD: a document type or entity declaration (the way to write entity
    expansion bombs and external entities) is refused before anything in it is read."""
    def refuse(*_: object) -> None:
        raise AnnotationError(f"{path}: has a <!DOCTYPE> or <!ENTITY> declaration, which ASAP XML "
                              "never has; remove it (entities are not expanded)")

    found: list[tuple[dict, list[dict]]] = []
    open_annotations = [0]

    def start(tag: str, attrs: dict) -> None:
        if tag == "Annotation":
            found.append((attrs, []))
            open_annotations[0] += 1
        elif tag == "Coordinate" and open_annotations[0]:
            found[-1][1].append(attrs)

    def end(tag: str) -> None:
        if tag == "Annotation":
            open_annotations[0] -= 1

    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler, parser.EndElementHandler = start, end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise AnnotationError(f"{path}: cannot read ASAP XML ({e})") from None
    return found


def _asap_order(coords: list[dict], where: str) -> list[dict]:
    """Coordinates sorted by their ``Order`` attribute (a whole number; 0 when missing)."""
    order = [c.get("Order", "0").strip() for c in coords]
    bad = next((o for o in order if not o.isdigit()), None)
    if bad is not None:
        raise AnnotationError(f"{where}: a coordinate has Order={bad[:40]!r}, not a whole "
                              "number; fix the coordinate or delete the annotation")
    return [c for _, c in sorted(zip(map(int, order), coords), key=lambda t: t[0])]


def read_asap(path: str | Path) -> list[Polygon]:
    """Polygons of an ASAP XML file; the class is the annotation's ``PartOfGroup``."""
    out: list[Polygon] = []
    n = 0
    for i, (a, coords) in enumerate(_asap_elements(_read_limited(path, "ASAP XML"), path)):
        if a.get("Type", "Polygon") not in ("Polygon", "Spline", "Rectangle"):
            continue
        where = f"{path}: annotation {a.get('Name', i)!r}"
        if len(coords) < 3:
            raise AnnotationError(f"{where} has fewer than 3 coordinates")
        xy = np.array([[_asap_number(c, "X", k, where), _asap_number(c, "Y", k, where)]
                       for k, c in enumerate(_asap_order(coords, where))])
        polygon = Polygon(a.get("PartOfGroup") or a.get("Name") or "", xy)
        n = _n_points([polygon], path, n)
        out.append(polygon)
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
