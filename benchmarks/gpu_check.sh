#!/usr/bin/env bash
# GPU check in one shot (under 8 minutes on one GPU): label agreement CUDA vs CPU (fp32 and fp16)
# on CMU-1 and the demo slide, a 20k x 20k synthetic slide end to end and model-only with GPU
# utilisation, a 2-minute wsiseg-train smoke on CUDA with bf16 autocast; one table at the end.
#
#   benchmarks/gpu_check.sh              # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU at small sizes (CI)
#
# Inference runs in a fresh venv with onnxruntime-gpu and without onnxruntime (the two install
# the same module and must never share an environment). Training runs in a venv that sees the
# system's site-packages, where a CUDA build of torch is expected. Offline machines: set
# WHEELS=DIR to install from a folder of wheels (pip --no-index --find-links DIR).
# Environment: GPU_CHECK_OUT (results folder, default: a new temporary one), PYTHON (dry run:
# the interpreter of an environment that has wsiseg[train] installed, default python3),
# SIDE_PX (synthetic slide side, default 20000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t wsiseg-gpu-check.XXXXXX)}"
DRY=()
case "${1:-}" in
  --dry-run) DRY=(--dry-run) ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
echo "gpu_check: results in $OUT" >&2

if [[ ${#DRY[@]} -gt 0 ]]; then
  INFER_PY="${PYTHON:-python3}"
  TRAIN_PY="$INFER_PY"
else
  PIP_SRC=()
  [[ -n "${WHEELS:-}" ]] && PIP_SRC=(--no-index --find-links "$WHEELS")
  python3 -m venv "$OUT/venv-gpu"
  INFER_PY="$OUT/venv-gpu/bin/python"
  # wsiseg without its dependencies, then those minus onnxruntime, then the gpu extra
  "$INFER_PY" - "$ROOT/pyproject.toml" >"$OUT/requirements-gpu.txt" <<'EOF'
import re, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = [d for d in p["dependencies"] if re.split(r"[\s\[<>=!~;]", d)[0] != "onnxruntime"]
print("\n".join(deps + p["optional-dependencies"]["gpu"]))
EOF
  "$INFER_PY" -m pip install -q "${PIP_SRC[@]}" --no-deps "$ROOT"
  "$INFER_PY" -m pip install -q "${PIP_SRC[@]}" -r "$OUT/requirements-gpu.txt"
  if "$INFER_PY" -m pip show -q onnxruntime 2>/dev/null; then
    echo "gpu_check: the CPU onnxruntime got into the GPU venv; remove it" >&2; exit 1
  fi
  python3 -m venv --system-site-packages "$OUT/venv-train"
  TRAIN_PY="$OUT/venv-train/bin/python"
  "$TRAIN_PY" -m pip install -q "${PIP_SRC[@]}" --no-deps "$ROOT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
fi

cd "$ROOT"
"$INFER_PY" benchmarks/gpu_check.py inference --out "$OUT" --side-px "${SIDE_PX:-20000}" "${DRY[@]}"
"$TRAIN_PY" benchmarks/gpu_check.py train --out "$OUT" "${DRY[@]}"
"$INFER_PY" benchmarks/gpu_check.py table --out "$OUT"
