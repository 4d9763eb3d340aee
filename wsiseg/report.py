"""What a run reports, in one place: the report JSON, the descriptions stored in the map TIFFs,
the CSV row, and the lines people read (the preview's legend, the terminal summary and the name
of the hot-spot annotation).

Nothing here measures, reads or writes: the numbers come from the pipeline, ``wsiseg.stats``
and ``wsiseg.tsr``, and the callers write what these functions return.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .contract import ModelContract, to_metadata
from .qc import text_lines as qc_text_lines
from .stats import ClassStats
from .tiling import TilePlan, computed_px_ratio
from .tissue import area_mm2
from .tsr import NO_DATA, Hotspot, TSRResult

if TYPE_CHECKING:
    from .engine import Model
    from .slide import SlideInfo

MAP_KIND = "class map"  # the "kind" of a map TIFF's description; `wsiseg report` checks it
HOTSPOT = "TSR hot spot"


# -- the descriptions stored in the TIFFs ---------------------------------------------------

def map_description(contract: ModelContract, *, mpp: float, slide: SlideInfo, qc: dict) -> dict:
    """The JSON of the class map's first page: the legend for viewers, and all that
    ``wsiseg report`` needs to measure the map again (``wsiseg.analysis.read_map_info``)."""
    return {"wsiseg": __version__, "kind": MAP_KIND, "mpp": mpp, "slide": Path(slide.path).name,
            "slide_mpp": slide.mpp, "legend": contract.legend(), "contract": to_metadata(contract),
            "qc": qc}


def probabilities_description(map_desc: dict) -> dict:
    """The JSON of the probability stack: the map's, with its own kind."""
    return {**map_desc, "kind": "class probabilities x255"}


def tsr_map_description(tsr: TSRResult, *, slide: str) -> dict:
    return {"kind": "tsr map", "unit": "percent stroma / (stroma + tumour)", "no_data": NO_DATA,
            "field_diameter_um": tsr.config.field_diameter_um,
            "tumour_classes": list(tsr.tumour_classes), "stroma_classes": list(tsr.stroma_classes),
            "slide": slide}


# -- the report JSON ------------------------------------------------------------------------

def run_report(*, slide: SlideInfo, model: Model, tiles: TilePlan, map_path: Path,
               levels: Sequence[tuple[int, int]], parameters: Mapping[str, Any],
               counts: np.ndarray, qc: dict, section: dict, timing: dict[str, float],
               software: dict[str, str]) -> dict:
    """The report of one ``segment`` run (``MAP.json``).

    ``parameters`` are the options as run (``SegmentOptions.to_dict()`` with the tile size,
    batch size and workers decided), ``counts`` the map's pixels per value, ``section`` the
    analysis (``wsiseg.analysis.analyse_map``) and ``timing`` the seconds of each step; the
    tissue throughput is added to it."""
    c, plan, run = model.contract, tiles.plan, tiles.tiles
    out_px = plan.out_shape[0] * plan.out_shape[1]
    px_mm2 = plan.mpp * plan.mpp / 1e6
    timing["tissue_mpx_per_s"] = len(run) and (
        sum(t.core_h * t.core_w for t in run) / 1e6 / timing["tiles_s"])
    return {
        "wsiseg": __version__,
        "slide": slide.to_dict(),
        "map": {"path": str(map_path), "mpp": plan.mpp, "shape": list(plan.out_shape),
                "levels": [list(lv) for lv in levels], "read_plan": plan.to_dict()},
        "model": model.to_dict(),
        "parameters": {**parameters, "precision": c.precision, "border_px": c.border_px},
        "tiles": {"total": len(tiles.all_tiles), "run": len(run),
                  "fitted_edges": tiles.fit_multiple > 0,
                  # [input height, input width, tiles run] per tile shape, most frequent first
                  "shapes": [[h, w, n] for (h, w), n in
                             Counter((t.in_h, t.in_w) for t in run).most_common()],
                  "computed_px_per_output_px": computed_px_ratio(run, out_px=out_px)},
        "tissue_mm2": area_mm2(tiles.mask, mpp=tiles.thumb_mpp),
        "class_area_mm2": {name: float(counts[i + 1]) * px_mm2
                           for i, name in enumerate(c.class_names)},
        "not_analysed_mm2": float(counts[0]) * px_mm2,
        "qc": qc,
        **section,
        "timing": timing,
        "software": software,
    }


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


# -- the CSV row ----------------------------------------------------------------------------

_TSR_COLUMNS = ("tsr_whole_pct", "tsr_hotspot_pct", "tsr_score_pct", "tsr_category",
                "tsr_fields", "tsr_fields_min_pct", "tsr_fields_median_pct",
                "tsr_fields_max_pct", "tsr_reason")


def csv_header(class_names: Sequence[str], *, with_tsr: bool = True) -> list[str]:
    """Column names of :func:`csv_row`: slide, mpp, areas, per-class mm2 and fraction, TSR."""
    cols = ["slide", "mpp", "analysed_mm2", "tissue_mm2"]
    for name in class_names:
        cols += [f"{name} mm2", f"{name} fraction"]
    return cols + list(_TSR_COLUMNS if with_tsr else ())


def _fmt(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def csv_row(slide: str, stats: ClassStats, tsr: TSRResult | None = None, *,
            with_tsr: bool = True) -> list[str]:
    """One CSV row per slide, matching :func:`csv_header`; empty cells where a value is None.

    Write it with ``csv.writer(f).writerow(...)``. Areas have 4 decimals (0.0001 mm2 = a
    10 x 10 um square), fractions 4, TSR percentages 1.
    """
    row = [slide, f"{stats.mpp:g}", _fmt(stats.analysed_mm2, 4), _fmt(stats.tissue_mm2, 4)]
    for c in stats.classes:
        row += [_fmt(c.area_mm2, 4), _fmt(c.fraction_of_tissue, 4)]
    if not with_tsr:
        return row
    if tsr is None:
        return row + [""] * (len(_TSR_COLUMNS) - 1) + ["TSR not measured"]
    whole, hot, dist = tsr.whole, tsr.hotspot, tsr.fields
    reasons = [r for r in (tsr.whole_reason, tsr.hotspot_reason) if r]
    return row + [
        _fmt(whole.tsr_pct if whole else None, 1),
        _fmt(hot.tsr_pct if hot else None, 1),
        "" if hot is None else str(hot.score_pct),
        "" if hot is None else hot.category,
        str(dist.count),
        _fmt(dist.min_pct, 1), _fmt(dist.median_pct, 1), _fmt(dist.max_pct, 1),
        "; ".join(dict.fromkeys(reasons)),
    ]


def csv_text(slide: str, stats: ClassStats, tsr: TSRResult | None, *, class_names: Sequence[str],
             with_tsr: bool) -> str:
    """``MAP.csv``: the header and the slide's row."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(csv_header(class_names, with_tsr=with_tsr))
    w.writerow(csv_row(slide, stats, tsr, with_tsr=with_tsr))
    return buf.getvalue()


# -- lines people read ----------------------------------------------------------------------

def hotspot_result(hot: Hotspot | Mapping[str, Any], *, score: bool = True) -> str:
    """The hot spot's TSR and category, e.g. ``48% (score 50%, stroma-low)`` (without the
    score: ``48% (stroma-low)``). ``hot`` is a Hotspot or its dict in the report."""
    get = hot.get if isinstance(hot, Mapping) else lambda key: getattr(hot, key)
    return (f"{get('tsr_pct'):.0f}% (score {get('score_pct')}%, {get('category')})" if score
            else f"{get('tsr_pct'):.0f}% ({get('category')})")


def hotspot_sentence(hot: Hotspot | Mapping[str, Any] | None, reason: str | None, *,
                     terse: bool = False) -> str:
    """The one line on the hot spot: ``TSR hot spot: 48% (score 50%, stroma-low)``, or
    ``TSR hot spot: none - REASON``; ``terse`` (the terminal's): ``TSR hot spot: 48%
    (stroma-low)`` or ``TSR hot spot: none (REASON)``."""
    if hot:
        return f"{HOTSPOT}: {hotspot_result(hot, score=not terse)}"
    return f"{HOTSPOT}: none ({reason})" if terse else f"{HOTSPOT}: none - {reason}"


def hotspot_name(hot: Hotspot) -> str:
    """The name of the hot-spot annotation in the GeoJSON."""
    return f"{HOTSPOT} {hotspot_result(hot)}"


def tsr_text_lines(tsr: TSRResult) -> list[str]:
    """Human-readable lines for a TSR result (the preview's legend)."""
    whole, fields = tsr.whole, tsr.fields
    lines = [hotspot_sentence(tsr.hotspot, tsr.hotspot_reason),
             f"TSR whole tumour: {whole.tsr_pct:.0f}% (score {whole.score_pct}%)"
             if whole else f"TSR whole tumour: none - {tsr.whole_reason}"]
    if fields.count:
        lines.append(f"Eligible fields ({fields.centres_mm2:.2g} mm2 of centres): min "
                     f"{fields.min_pct:.0f}%, median {fields.median_pct:.0f}%, "
                     f"max {fields.max_pct:.0f}%")
    lines.append(f"Field {tsr.config.field_diameter_um / 1000:g} mm; stroma = "
                 + ", ".join(tsr.stroma_classes) + "; tumour = " + ", ".join(tsr.tumour_classes))
    return lines


def preview_lines(slide: str, contract: ModelContract, tsr: TSRResult | None,
                  qc: Mapping[str, Any]) -> list[str]:
    """The text beside the preview: slide and model, the TSR numbers, the QC findings."""
    return [f"{slide}  ({contract.name} v{contract.version})",
            *(tsr_text_lines(tsr) if tsr is not None else []),
            *qc_text_lines(qc)]


def summary(map_path: Path, report: Mapping[str, Any]) -> str:
    """What ``wsiseg segment`` prints for one slide: the map written, and the hot spot."""
    m = report["map"]
    lines = [f"wrote {map_path} ({m['shape'][1]} x {m['shape'][0]} px at {m['mpp']:.3g} um/px) "
             f"in {report['timing']['total_s']:.1f} s"]
    tsr = report.get("tsr")
    if tsr:
        lines.append(hotspot_sentence(tsr.get("hotspot"), tsr.get("hotspot_reason"), terse=True))
    return "\n".join(lines)
