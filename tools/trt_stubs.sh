#!/usr/bin/env bash
# Prepares type stubs for `tensorrt` so mypy can check quantpipe/backends/tensorrt/ where TensorRT itself
# cannot be installed (its libraries are not on the package index these machines reach).
#
#   bash tools/trt_stubs.sh [PYTHON]    # the interpreter whose pip downloads the stubs (default: python3)
#
# The stubs land in .typings/ (pyproject's [tool.mypy] mypy_path; the folder ignores itself in git);
# TRT_STUBS_DEST overrides that. Then: mypy quantpipe/backends/tensorrt quantpipe/cuda.py
#
# Steps (see tensorrt-typecheck.md in the shared notes): install tensorrt-stubs with --no-deps (with its
# dependencies it pulls tensorrt, which cannot be downloaded here), copy the two stub packages into DEST
# (the wheel ships no py.typed next to them, so mypy would skip them where they are), and patch the two
# spots that do not parse. We do not commit third-party stub files: this script recreates them.
# Idempotent and fast: a stamp records the pinned version and this script's hash; a second run is a no-op.
set -euo pipefail

VERSION=10.13.0.35.1
root=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-${PYTHON:-python3}}
dest=${TRT_STUBS_DEST:-"$root/.typings"}
stamp="$dest/.stamp"
want="tensorrt-stubs==$VERSION $(sha256sum "$0" | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip install -q --disable-pip-version-check --no-deps --target "$tmp/site" "tensorrt-stubs==$VERSION"

for pkg in tensorrt tensorrt_bindings; do
  [[ -d "$tmp/site/$pkg" ]] || { echo "trt_stubs.sh: tensorrt-stubs==$VERSION has no $pkg/ folder" >&2; exit 1; }
done

rm -rf "$dest.new"
mkdir -p "$dest.new"
cp -r "$tmp/site/tensorrt" "$tmp/site/tensorrt_bindings" "$dest.new/"
bindings="$dest.new/tensorrt_bindings/tensorrt.pyi"
# 1. Parameters named `in` (a Python keyword) in plugin methods.
sed -i -E 's/\bin: list\[/in_: list[/g' "$bindings"
# 2. A non-default parameter after defaulted ones: add_scale_nd(..., power: Weights = None, channel_axis: int).
sed -i -E 's/(power: Weights = None, channel_axis: int)\)/\1 = ...)/' "$bindings"
# Check both patches took (a newer stub release may have fixed them differently: then this script needs a look).
if grep -qE '\bin: list\[' "$bindings" || grep -qE 'channel_axis: int\) ->' "$bindings"; then
  echo "trt_stubs.sh: patching $bindings failed; compare it with tensorrt-typecheck.md" >&2
  exit 1
fi
"$python" - "$dest.new" <<'PY'
import ast, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).rglob("*.pyi")):
    ast.parse(f.read_text(), filename=str(f))
PY
# The folder ignores itself, so it stays out of git whatever the repository's .gitignore says.
printf '*\n' > "$dest.new/.gitignore"
printf '%s\n' "$want" > "$dest.new/.stamp"
rm -rf "$dest"
mv "$dest.new" "$dest"
echo "trt_stubs.sh: tensorrt-stubs $VERSION patched into $dest"
