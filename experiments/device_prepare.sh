#!/usr/bin/env bash
# Builds what the GPU device suite carries, here on the CPU machine (docs/gpu.md):
#
#     bash experiments/device_prepare.sh PATH/chest_xray
#
# - .whl/      wheels, for the GPU machine's Python 3.12 on x86-64, of the packages its image
#              lacks (grain, tensorflow-datasets, ml-collections, array-record, pydicom,
#              tensorboardX and what they import), each at the version installed here, so the GPU runs what CI tested;
# - .gpudata/  the real X-rays as their own JPEG files (train/ and val/ only, about 37 MB: the
#              most compact form there is; the suite prepares them at 224 px on the GPU machine's
#              16 cores) and MANIFEST.json, which the suite checks the carried files against.
#
# Both folders are git-ignored and replaced whole, so running it again gives the same result.
# PATH/chest_xray must hold train/ (and may hold val/) in the Kaggle layout; test/ is never copied.
# It needs this project installed (`pip install -e ".[test]"`) and pip access to the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SRC=${1:?usage: bash experiments/device_prepare.sh PATH/chest_xray}
[ -d "$SRC/train" ] || { echo "error: $SRC/train not found: give the folder that holds train/ and val/" >&2; exit 2; }

# Missing on the GPU image (the device tool's KINDS.md package list): the six the suite needs and
# the modules they import at run time. Keep one version of each.
PACKAGES="tensorflow-datasets grain array-record ml-collections pydicom tensorboardX dm-tree
immutabledict promise simple-parsing docstring-parser tensorflow-metadata googleapis-common-protos
termcolor toml portpicker importlib-resources"
PLATFORM="--only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

rm -rf .whl.new && mkdir .whl.new
for name in $PACKAGES; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
    { echo "error: $name is not installed here; run: python -m pip install -e \".[test]\"" >&2; exit 2; }
  # shellcheck disable=SC2086  # PLATFORM is a list of options
  if ! "$PY" -m pip download -q --no-deps $PLATFORM -d .whl.new "$name==$version" 2>/dev/null; then
    # Published as a source archive only (promise): build the wheel, which must be pure Python.
    "$PY" -m pip wheel -q --no-deps -w .whl.new "$name==$version"
  fi
done
# The image's protobuf is older than the carried tensorflow-metadata's generated code
# needs (>= 6.31)? device_suite.sh then takes this one too, only if the import fails without it.
mkdir .whl.new/fallback
protobuf=$("$PY" -c "import importlib.metadata as m; print(m.version('protobuf'))")
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps $PLATFORM -d .whl.new/fallback "protobuf==$protobuf"
for whl in .whl.new/*.whl .whl.new/fallback/*.whl; do
  case "$whl" in
    *-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
    *) echo "error: $whl does not run on the GPU machine (CPython 3.12, x86-64)" >&2; exit 2 ;;
  esac
done
# What the suite's own install does there, checked against that machine's tags without installing.
# shellcheck disable=SC2086
"$PY" -m pip install -q --dry-run --no-index --no-deps --target /tmp/device_prepare_check \
    $PLATFORM .whl.new/*.whl .whl.new/fallback/*.whl
rm -rf .whl && mv .whl.new .whl

rm -rf .gpudata.new && mkdir -p .gpudata.new/chest_xray
for split in train val; do
  [ -d "$SRC/$split" ] && cp -r "$SRC/$split" .gpudata.new/chest_xray/
done
"$PY" - .gpudata.new/chest_xray <<'EOF'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
counts = {f"{s.name}/{c.name}": sum(1 for f in c.iterdir() if f.is_file())
          for s in sorted(root.iterdir()) for c in sorted(s.iterdir()) if c.is_dir()}
(root.parent / "MANIFEST.json").write_text(json.dumps({"chest_xray": counts}, indent=1) + "\n")
EOF
rm -rf .gpudata && mv .gpudata.new .gpudata

whl=$(du -sm .whl | cut -f1); gpu=$(du -sm .gpudata | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1)
echo "carry: .whl ${whl} MB ($(ls .whl/*.whl | wc -l) wheels, fallback: $(ls .whl/fallback)), .gpudata ${gpu} MB, tracked files ${tree} MB"
if [ $((whl + gpu + tree)) -gt 60 ]; then
  echo "error: over the device's 64 MiB carry limit; carry less" >&2; exit 2
fi
echo "device call: command \"PNEUMOJAX_COMMIT=$(git rev-parse --short=12 HEAD) bash" \
     "experiments/device_suite.sh\", carry [\".whl\", \".gpudata\"], timeout_s 540" \
     "(commit first: the copy of the tree that travels has no .git)"
