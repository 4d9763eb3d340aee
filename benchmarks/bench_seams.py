"""Seams and their cost: tile-size agreement of maps, and what the border costs end to end.

    python benchmarks/bench_seams.py --model MODEL.onnx [--tile-px 384 2048] [--slide S ...]
                                     [--cost-only]

For each slide (default: the two demo slides in examples/): ``wsiseg.seams.tile_agreement``
with the two tile sizes (every tile run, no analysis outputs), then ``segment_slide`` with the
default options (tile size chosen by the engine, tissue mask, all outputs) for the cost:
tile size, computed px per output px and wall time. Results go to stdout as JSON lines;
benchmarks/RESULTS.md records runs with their machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import machine  # noqa: E402

SLIDES = [ROOT / "examples" / "ebhi-val-mosaic.tif", ROOT / "examples" / "CMU-1-Small-Region.svs"]


def cost(slide: Path, model) -> dict:
    from wsiseg.pipeline import SegmentOptions, segment_slide

    with tempfile.TemporaryDirectory() as tmp:
        r = segment_slide(slide, Path(tmp) / "map.tif", model=model,
                          options=SegmentOptions(device="cpu"))
    return {"tile_px": r["parameters"]["tile_px"], "tiles": r["tiles"]["run"],
            "computed_px_per_output_px": r["tiles"]["computed_px_per_output_px"],
            "tiles_s": r["timing"]["tiles_s"], "total_s": r["timing"]["total_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "wsiseg-ebhi-unet.onnx")
    ap.add_argument("--slide", type=Path, nargs="*", default=SLIDES)
    ap.add_argument("--tile-px", type=int, nargs=2, default=(256, 1024))
    ap.add_argument("--cost-only", action="store_true", help="Skip the agreement runs.")
    args = ap.parse_args()

    from wsiseg.engine import load_model
    from wsiseg.seams import tile_agreement
    from wsiseg.tiling import largest_tile_px

    model = load_model(args.model, device="cpu")
    c = model.contract
    big = largest_tile_px(c.border_px, multiple=c.size_multiple)
    print(json.dumps({"machine": machine(), "model": f"{c.name} v{c.version}",
                      "border_px": c.border_px, "largest_tile_px": big,
                      "large_slide_computed_px_per_output_px":
                          (big / (big - 2 * c.border_px)) ** 2}), flush=True)
    for slide in args.slide:
        agreement = None if args.cost_only else \
            tile_agreement(slide, model, tile_sizes=tuple(args.tile_px))
        print(json.dumps({"slide": slide.name, "agreement": agreement,
                          "default_run": cost(slide, model)}), flush=True)


if __name__ == "__main__":
    main()
