#!/usr/bin/env bash
# Build (once per Python + torch version) an mmcv 2.1.0 wheel with its C++ ops, and print its path.
#
# PyPI has only mmcv 2.1.0's sdist, and its setup.py hard-codes -std=c++17 while torch 2.14's
# headers need C++20: we build from a throw-away copy of the sdist with that one flag changed.
# The wheel is cached under $MMDET_DCNV2_CACHE (default ~/.cache/mmdet_dcnv2), keyed on the Python
# and torch versions it was built against, since it is only valid for those.
# Usage: scripts/build_mmcv_wheel.sh PYTHON   (a Python that already has torch installed)
set -euo pipefail
py=$(command -v "${1:?usage: build_mmcv_wheel.sh PYTHON}"); py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")
version=2.1.0
key=$("$py" -c 'import sys, torch; print("py%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], torch.__version__.replace("+", "_")))')
cache=${MMDET_DCNV2_CACHE:-$HOME/.cache/mmdet_dcnv2}/wheels/$key
shopt -s nullglob
existing=("$cache"/mmcv-$version-*.whl)
if [ ${#existing[@]} -gt 0 ]; then
  echo "${existing[0]}"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building mmcv $version with ops for $key (about 20 minutes on 2 cores; cached afterwards)" >&2
"$py" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$version" >&2 \
  || "$py" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "mmcv==$version" >&2
tar -xzf "$work"/mmcv-$version.tar.gz -C "$work"
src="$work/mmcv-$version"
grep -q -- "-std=c++17" "$src/setup.py" || { echo "mmcv setup.py no longer has -std=c++17; check the patch" >&2; exit 1; }
sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
# FORCE_CUDA stays unset: on a machine without a GPU mmcv builds its CPU ops only, which is what the
# tests compare against (mmcv's CUDA ops would add ~1 hour of compile for nothing we can run here).
(cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" . >&2)
mkdir -p "$cache"
cp "$work"/dist/mmcv-$version-*.whl "$cache"/
existing=("$cache"/mmcv-$version-*.whl)
echo "${existing[0]}"
