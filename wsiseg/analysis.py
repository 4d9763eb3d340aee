"""Measurements and viewer files from a written class map: the step after inference.

``analyse_map`` reads a map TIFF written by ``wsiseg segment`` (its pyramid levels, never the
whole full-resolution map at once) and writes, beside it:

- ``MAP.csv``: one header and one row per slide (class areas, fractions, TSR) for cohort tables;
- ``MAP.tsr.tif``: the local TSR of the field centred on each pixel of a coarse grid, as a
  pyramidal TIFF (0-100 %, 255 = no eligible field) with a heat-map palette;
- ``MAP.geojson``: per-class polygons and the TSR hot-spot circle in slide level-0 pixels,
  for QuPath (File > Import objects);
- ``MAP.preview.png``: thumbnail, class overlay, TSR heat-map, legend, hot spot and numbers.

It is run by ``segment_slide`` after the map is written, and by ``wsiseg report MAP.tif`` on an
existing map (a re-analysis needs no re-inference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .contract import ModelContract, from_metadata
from .files import write_text_atomic
from .geojson import class_features, hotspot_feature, write_geojson
from .preview import hotspot_circle_px, make_preview
from .report import MAP_KIND, csv_text, preview_lines, tsr_map_description
from .stats import class_stats_from_counts
from .tsr import TSRConfig, TSRResult, measure_tsr_with_contract, tsr_lut
from .writer import count_level_values, level_shapes, read_description, read_level, write_pyramid

OUTPUT_SUFFIXES = {"csv": ".csv", "tsr": ".tsr.tif", "geojson": ".geojson",
                   "preview": ".preview.png"}


class MapError(ValueError):
    """The file is not a class map that wsiseg can measure; the message says why."""


@dataclass(frozen=True)
class AnalysisOptions:
    tsr: bool = True  # TSR numbers and the TSR map
    geojson: bool = True
    preview: bool = True
    csv: bool = True
    tsr_config: TSRConfig = field(default_factory=TSRConfig)
    geojson_um: float = 8.0  # polygons are traced on the finest level at most this coarse
    preview_um: float = 8.0

    def to_dict(self) -> dict:
        return asdict(self)

    def wanted(self, outputs: dict[str, Path]) -> list[Path]:
        """The paths of ``outputs`` that these options will write."""
        on = {"tsr": self.tsr, "geojson": self.geojson, "preview": self.preview, "csv": self.csv}
        return [p for k, p in outputs.items() if on.get(k)]


def outputs_beside(map_path: Path) -> dict[str, Path]:
    """Where the analysis files of ``MAP.tif`` go: ``MAP.csv``, ``MAP.tsr.tif``, ..."""
    stem = map_path.with_suffix("")
    return {k: stem.with_name(stem.name + s) for k, s in OUTPUT_SUFFIXES.items()}


@dataclass(frozen=True)
class MapInfo:
    """What the analysis needs to know about a written map (from its TIFF description)."""

    path: Path
    contract: ModelContract
    mpp: float  # level 0
    slide_mpp: float  # level-0 microns per pixel of the slide the map was made from
    slide: str
    shapes: tuple[tuple[int, int], ...]
    qc: dict = field(default_factory=dict)  # the run's quality-control block (wsiseg.qc)

    @property
    def background(self) -> list[int]:
        """The map value of the background class, if the model has one (not tissue)."""
        return [self.contract.background_value] if self.contract.background_value else []

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [k.color for k in self.contract.classes]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.shapes[0][1] / self.shapes[level][1]

    def coarsest_level_within(self, um: float, *, max_px: float = 16e6) -> int:
        """The coarsest level whose pixels are at most ``um`` microns (level 0 at least), or a
        coarser one if that level holds more than ``max_px`` pixels (memory stays bounded)."""
        ok = [k for k in range(len(self.shapes)) if self.level_mpp(k) <= um * (1 + 1e-6)]
        k = max(ok) if ok else 0
        while k + 1 < len(self.shapes) and self.shapes[k][0] * self.shapes[k][1] > max_px:
            k += 1
        return k


def read_map_info(path: Path) -> MapInfo:
    try:
        desc = read_description(path)
    except ValueError as e:  # not a TIFF, or a description that is not wsiseg's JSON
        raise MapError(f"{path} is not a class map written by wsiseg segment ({e})") from None
    if desc.get("kind") != MAP_KIND or "contract" not in desc:
        raise MapError(f"{path} is not a class map written by wsiseg segment "
                       "(its TIFF description lacks the model contract)")
    mpp = desc.get("mpp")
    if not isinstance(mpp, (int, float)) or mpp <= 0:
        raise MapError(f"{path} does not record its pixel size (mpp); it cannot be measured")
    return MapInfo(path=path, contract=from_metadata(desc["contract"]), mpp=float(mpp),
                   slide_mpp=float(desc.get("slide_mpp") or mpp), slide=str(desc.get("slide", "")),
                   shapes=tuple(level_shapes(path)),
                   qc=desc["qc"] if isinstance(desc.get("qc"), dict) else {})


def analyse_map(map_path: str | Path, *, options: AnalysisOptions = AnalysisOptions(),
                thumbnail: tuple[np.ndarray, float] | None = None,
                outputs: dict[str, Path] | None = None,
                counts: np.ndarray | None = None) -> dict:
    """Measure a class map and write the analysis files; return the report section.

    ``thumbnail`` is (rgb, mpp) of the slide, covering the same area as the map (for the
    preview); without it the preview shows the classes on white. ``counts`` (pixels per map
    value, when the caller has them) saves a pass over the full-resolution map."""
    info = read_map_info(Path(map_path))
    c = info.contract
    outputs = outputs or outputs_beside(info.path)
    if counts is None:
        counts = count_level_values(info.path, n_values=c.n_classes + 1)
    stats = class_stats_from_counts(counts, mpp=info.mpp, class_names=c.class_names,
                                    shape_px=info.shapes[0], background_values=info.background)
    section: dict = {"class_stats": stats.to_dict(), "outputs": {}}
    written = section["outputs"]
    tsr = _measure_tsr(info, options.tsr_config) if options.tsr else None
    if tsr is not None:
        section["tsr"] = tsr.to_dict()
        write_pyramid(outputs["tsr"], tsr.tsr_map, mpp=tsr.grid_mpp, colormap=tsr_lut(),
                      tile_px=256, description=tsr_map_description(tsr, slide=info.slide))
        written["tsr"] = str(outputs["tsr"])
    if options.csv:
        write_text_atomic(outputs["csv"], csv_text(info.slide or info.path.stem, stats, tsr,
                                                   class_names=c.class_names,
                                                   with_tsr=options.tsr))
        written["csv"] = str(outputs["csv"])
    if options.geojson:
        write_geojson(outputs["geojson"], _features(info, tsr, max_um=options.geojson_um))
        written["geojson"] = str(outputs["geojson"])
    if options.preview:
        _write_preview(outputs["preview"], info, tsr, thumbnail=thumbnail,
                       max_um=options.preview_um)
        written["preview"] = str(outputs["preview"])
    return section


def _measure_tsr(info: MapInfo, config: TSRConfig) -> TSRResult:
    """TSR on the coarsest level at most as coarse as the TSR's working grid."""
    k = info.coarsest_level_within(config.grid_um)
    return measure_tsr_with_contract(read_level(info.path, level=k), info.contract,
                                     mpp=info.level_mpp(k), config=config)


def _features(info: MapInfo, tsr: TSRResult | None, *, max_um: float) -> list[dict]:
    """GeoJSON features: the class polygons, traced on the coarsest level at most ``max_um``
    per pixel, and the hot-spot circle."""
    c = info.contract
    k = info.coarsest_level_within(max_um)
    mpp_k = info.level_mpp(k)
    features = class_features(read_level(info.path, level=k), class_names=c.class_names,
                              colors=info.colors, mpp=mpp_k, scale=mpp_k / info.slide_mpp,
                              skip_values=info.background)
    if tsr is not None and tsr.hotspot is not None:
        features.append(hotspot_feature(tsr.hotspot, slide_mpp=info.slide_mpp))
    return features


def _write_preview(path: Path, info: MapInfo, tsr: TSRResult | None, *,
                   thumbnail: tuple[np.ndarray, float] | None, max_um: float) -> None:
    """The preview on the slide's thumbnail (on white without one), from the map level
    closest to the thumbnail's resolution (or at most ``max_um`` per pixel)."""
    c = info.contract
    k = info.coarsest_level_within(thumbnail[1] if thumbnail else max_um)
    labels = read_level(info.path, level=k)
    if thumbnail is None:
        rgb, rgb_mpp = np.full((*labels.shape, 3), 255, np.uint8), info.level_mpp(k)
    else:
        rgb, rgb_mpp = thumbnail
    hot = tsr.hotspot if tsr is not None else None
    make_preview(rgb, labels, colors=info.colors, names=c.class_names, path=path,
                 skip_values=info.background,
                 hotspot_px=hotspot_circle_px(hot, image_mpp=rgb_mpp) if hot else None,
                 text_lines=preview_lines(info.slide, c, tsr, info.qc),
                 tsr_map=tsr.tsr_map if tsr is not None else None,
                 lut=tsr_lut() if tsr is not None else None)
