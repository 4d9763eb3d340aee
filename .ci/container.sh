#!/usr/bin/env bash
# CI: build the CPU image, print its size, run it without network on a real slide through bind
# mounts, and check the class map on the host with OpenSlide. Needs root (podman, apt) and the
# project's venv active (python with openslide-python and onnx, to make the test model and check
# the output). Set WSISEG_CI_GPU_IMAGE=1 to also build Dockerfile.gpu (downloads ~3 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
SLIDE=../shared/data/slides/CMU-1-Small-Region.svs
if [ ! -f "$SLIDE" ]; then
  echo "container: $SLIDE not found; the container check needs the shared slides" >&2
  exit 1
fi
eval "$(../shared/tools/container-env.sh)"
echo "container: engine ready in $((SECONDS - START)) s"

T=$SECONDS
$CONTAINER build --pull=never --network host --build-arg BASE="$BASE_IMAGE" -t wsiseg:ci . >&2
echo "container: wsiseg:ci built in $((SECONDS - T)) s, size $($CONTAINER image inspect wsiseg:ci --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
$CONTAINER run --rm --network none --entrypoint sh wsiseg:ci -c \
  '! pip list 2>/dev/null | grep -i -E "^(torch|onnxruntime-gpu) "' \
  || { echo "container: torch or onnxruntime-gpu found in the CPU image" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/out" "$WORK/model"
chmod 0777 "$WORK/out"  # the image runs as its own non-root user (uid 1000)
python3 - "$WORK/model/test.onnx" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from onnx_models import colour_rule_model, contract
from wsiseg.contract import to_metadata
colour_rule_model(Path(sys.argv[1]), meta=to_metadata(
    contract(mpp=1.0, tile_px=256, border_px=16, size_multiple=16)))
PY
SLIDES=$(cd "$(dirname "$SLIDE")" && pwd)
T=$SECONDS
$CONTAINER run --rm --network none \
  -v "$SLIDES:/slides:ro" -v "$WORK/model:/models:ro" -v "$WORK/out:/data" \
  wsiseg:ci segment "/slides/$(basename "$SLIDE")" -o /data/cmu1.tif --model /models/test.onnx
echo "container: segmented $(basename "$SLIDE") in the container in $((SECONDS - T)) s"

python3 - "$WORK/out/cmu1.tif" <<'PY'
import json, sys
from pathlib import Path
import openslide
path = Path(sys.argv[1])
report = json.loads(path.with_suffix(".json").read_text())
with openslide.OpenSlide(str(path)) as osr:
    w, h = osr.dimensions
    mpp = float(osr.properties["openslide.mpp-x"])
    print(f"container: map on the host: {w} x {h} px, {osr.level_count} levels, mpp {mpp:.4f}, "
          f"classes (mm2) {', '.join(f'{k} {v:.3f}' for k, v in report['class_area_mm2'].items())}")
    assert osr.level_count >= 2, osr.level_count
    assert (w, h) == (2220 // 2, 2967 // 2), (w, h)  # 2 x 2 means: 0.998 um/px
    assert abs(mpp - 1.0) < 0.01, mpp
assert report["class_area_mm2"]["tumour"] > 0 and report["class_area_mm2"]["stroma"] > 0
PY

if ls models/*.onnx >/dev/null 2>&1; then  # the default model is baked in: run it as shipped
  T=$SECONDS
  $CONTAINER run --rm --network none -v "$SLIDES:/slides:ro" -v "$WORK/out:/data" \
    wsiseg:ci -q segment "/slides/$(basename "$SLIDE")" -o /data/default.tif
  python3 -c "import openslide, sys; o = openslide.OpenSlide(sys.argv[1]); print('container: default model map', o.dimensions, o.level_count, 'levels')" "$WORK/out/default.tif"
  echo "container: default (baked-in) model run in $((SECONDS - T)) s"
else
  echo "container: no models/*.onnx in the checkout: default model not baked in, its run skipped"
fi

if [ "${WSISEG_CI_GPU_IMAGE:-0}" = 1 ]; then
  T=$SECONDS
  $CONTAINER build --pull=never --network host --build-arg BASE="$BASE_IMAGE" -f Dockerfile.gpu -t wsiseg:gpu . >&2
  echo "container: wsiseg:gpu built in $((SECONDS - T)) s, size $($CONTAINER image inspect wsiseg:gpu --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
fi
echo "container: all checks passed in $((SECONDS - START)) s"
