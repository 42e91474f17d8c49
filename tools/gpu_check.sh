#!/usr/bin/env bash
# Everything promptmatch checks on a GPU, in one go, into one folder:
#
#   1. tests    pytest -m cuda (tests/test_cuda.py: training/evaluation in bf16 and fp16,
#               predict, prompt bank, checkpoints GPU<->CPU, ONNX export of a CUDA model,
#               both benchmark engines, torchrun with NCCL on the GPUs present)
#   2. smoke    tools/gpu_smoke.py: every method on ViT-B/16 and ResNet-50 at 512 px in bf16
#               (SPM also fp16), evaluation, predict, bank, save/load, ONNX, the benchmark on
#               both engines, torchrun --nproc_per_node 1 (table + JSON; at most 10 minutes)
#   3. profile  the `gpu` benchmark profile (11 cells, estimated 5-7 minutes on one H100/H200)
#
# Each part runs under its own time limit; a part that fails or times out is recorded and the
# next one runs. Nothing touches the network (HF_HUB_OFFLINE=1, pip --no-index). Results:
# <out>/summary.md (every part's status and its table), gpu_smoke.json, the logs, and the
# profile's folder bench_gpu/ (report.md, results.jsonl). Exit status 1 if a part failed.
#
#   bash tools/gpu_check.sh                                  # .venv if there, else python3
#   bash tools/gpu_check.sh --python python3 --wheels .whl --out /tmp/gpu_check --collect "$OUT"
#   bash tools/gpu_check.sh --only smoke --smoke-args "--only train,eval"
#
# On a bare GPU machine (torch, timm, onnxruntime installed; promptmatch not): the checkout is
# put on PYTHONPATH; missing pure-Python packages (mmengine, peft, ...) can be carried as
# wheels (--wheels DIR: installed with --no-index into <out>/site; a stardist-0.9.2 wheel there
# is only pointed at, as the data of the offline `nuclei` dataset). Without the mmseg stack
# (mmcv with ops built for that torch, mmsegmentation) the mmengine parts skip with the reason
# and the profile runs its in-memory cells only (said in summary.md).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/work_dirs/gpu_check"
py=""
wheels=""
collect=""
only="tests,smoke,profile"
t_tests=420
t_smoke=600
t_profile=540
smoke_args=""
profile="gpu"

usage() {
  sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

options:
  --out DIR             where everything goes (default: <repo>/work_dirs/gpu_check)
  --python PY           the interpreter to use (default: $PROMPTMATCH_VENV/bin/python,
                        <repo>/.venv/bin/python if it has torch, else python3)
  --venv DIR            use DIR/bin/python (an existing virtual environment)
  --wheels DIR          install DIR/*.whl offline into <out>/site first (--no-index --no-deps)
  --only PARTS          comma-separated parts: tests, smoke, profile (default: all three)
  --timeout-tests S     time limit of pytest -m cuda (default 420)
  --timeout-smoke S     time limit of the smoke run (default 600)
  --timeout-profile S   time limit of the profile (default 540)
  --smoke-args "ARGS"   extra arguments of tools/gpu_smoke.py (e.g. "--weights vit_b16.pth")
  --profile NAME        the benchmark profile (default gpu)
  --collect DIR         also copy the small result files (at most 8, flat) into DIR
  -h, --help            this help
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --venv) py="$2/bin/python"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --timeout-tests) t_tests="$2"; shift 2 ;;
    --timeout-smoke) t_smoke="$2"; shift 2 ;;
    --timeout-profile) t_profile="$2"; shift 2 ;;
    --smoke-args) smoke_args="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --collect) collect="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'gpu_check: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
done
for part in ${only//,/ }; do
  case "$part" in tests|smoke|profile) ;; *) echo "gpu_check: unknown part '$part' in --only (tests, smoke, profile)" >&2; exit 2 ;; esac
done

if [ -z "$py" ]; then
  for cand in "${PROMPTMATCH_VENV:+$PROMPTMATCH_VENV/bin/python}" "$repo/.venv/bin/python" python3; do
    if [ -n "$cand" ] && "$cand" -c "import torch" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
if [ -z "$py" ] || ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: no Python with torch found (tried ${py:-\$PROMPTMATCH_VENV, .venv, python3}); give one with --python or --venv" >&2
  exit 2
fi

mkdir -p "$out"
out="$(cd "$out" && pwd)"
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset PROMPTMATCH_ALLOW_DOWNLOAD
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$wheels" ]; then
  shopt -s nullglob
  install=()
  for w in "$wheels"/*.whl; do
    case "$(basename "$w")" in stardist-*) ;; *) install+=("$w") ;; esac
  done
  shopt -u nullglob
  export PROMPTMATCH_WHEELS="$(cd "$wheels" && pwd)${PROMPTMATCH_WHEELS:+:$PROMPTMATCH_WHEELS}"
  if [ ${#install[@]} -gt 0 ]; then
    echo "[gpu_check] installing ${#install[@]} wheel(s) from $wheels into $out/site (offline)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$out/site" \
      "${install[@]}" >"$out/wheels.log" 2>&1 || { echo "gpu_check: installing the wheels failed, see $out/wheels.log" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$out/site"
  fi
fi

summary="$out/summary.md"
failed=0
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not on the PATH"
  fi
  "$py" - <<'PY' 2>&1
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"GPUs: {torch.cuda.device_count()}")
for name in ("promptmatch", "timm", "peft", "onnx", "onnxruntime", "mmengine", "mmcv", "mmseg"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # a missing or broken optional package: said, not fatal
        print(f"  {name}: not importable ({type(e).__name__}: {str(e)[:120]})")
PY
  echo '```'
} >"$summary"
cp "$summary" "$out/environment.txt"
cat "$summary"

has_mmseg() { "$py" -c "import mmcv.ops, mmseg.models, promptmatch.mmseg" >/dev/null 2>&1; }

# run_part NAME LIMIT LOG CMD...: the command under `timeout`, its output in LOG, a line in summary.md
run_part() {
  local name="$1" limit="$2" log="$3"
  shift 3
  echo
  echo "[gpu_check] $name (at most ${limit} s): $*"
  local t0=$SECONDS rc
  ( cd "$repo" && timeout --kill-after=30 "$limit" "$@" ) >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT after ${limit} s"; failed=1
  elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; failed=1; fi
  echo "[gpu_check] $name: $status in ${took} s; log: $log"
  printf '\n## %s: %s in %s s\n\nlog: `%s`\n' "$name" "$status" "$took" "$log" >>"$summary"
}

for part in ${only//,/ }; do
  case "$part" in
    tests)
      run_part "pytest -m cuda" "$t_tests" "$out/pytest_cuda.log" \
        "$py" -m pytest tests -m cuda -q -rA -p no:cacheprovider --continue-on-collection-errors \
        --junitxml "$out/pytest_cuda.xml"
      { echo; echo '```'; grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed|error" "$out/pytest_cuda.log" | tail -60; echo '```'; } >>"$summary"
      ;;
    smoke)
      # shellcheck disable=SC2086  (smoke_args are words on purpose)
      run_part "smoke (tools/gpu_smoke.py)" "$t_smoke" "$out/gpu_smoke.log" \
        "$py" tools/gpu_smoke.py --out "$out/gpu_smoke.json" $smoke_args
      { echo; echo '```'; sed -n '/^step /,$p' "$out/gpu_smoke.log" | tail -80; echo '```'; } >>"$summary"
      ;;
    profile)
      spec_args=(--profile "$profile")
      if ! has_mmseg; then
        # the mmseg stack is missing: the profile's in-memory cells only (mmseg backbones left out)
        "$py" - "$profile" "$out/profile_${profile}_memory_only.json" <<'PY'
import json, sys
from promptmatch.benchmark import profile_path
spec = json.loads(profile_path(sys.argv[1]).read_text())
spec["backbones"] = [b for b in spec["backbones"] if not (isinstance(b, dict) and b.get("mmseg_model"))]
spec["name"] = spec["name"] + "-memory-only"
spec["description"] = "(mmseg stack missing: in-memory cells only) " + spec.get("description", "")
open(sys.argv[2], "w").write(json.dumps(spec, indent=1))
PY
        spec_args=(--spec "$out/profile_${profile}_memory_only.json")
        printf '\n(profile %s: the mmseg stack is not installed, so its mmengine cells were left out)\n' "$profile" >>"$summary"
      fi
      run_part "benchmark profile $profile" "$t_profile" "$out/bench_$profile.log" \
        "$py" -m promptmatch.benchmark "${spec_args[@]}" --out "$out/bench_$profile" --no-progress
      if [ -f "$out/bench_$profile/report.md" ]; then
        { echo; sed -n '1,120p' "$out/bench_$profile/report.md"; } >>"$summary"
      else
        { echo; echo '```'; tail -40 "$out/bench_$profile.log"; echo '```'; } >>"$summary"
      fi
      ;;
  esac
done

if [ -n "$collect" ]; then
  mkdir -p "$collect"
  for f in summary.md gpu_smoke.json pytest_cuda.log gpu_smoke.log "bench_$profile.log"; do
    [ -f "$out/$f" ] && cp "$out/$f" "$collect/"
  done
  [ -f "$out/bench_$profile/results.jsonl" ] && cp "$out/bench_$profile/results.jsonl" "$collect/bench_${profile}_results.jsonl"
  [ -f "$out/bench_$profile/report.md" ] && cp "$out/bench_$profile/report.md" "$collect/bench_${profile}_report.md"
fi

echo
echo "[gpu_check] results in $out: summary.md (start here), gpu_smoke.json, pytest_cuda.log, gpu_smoke.log, bench_$profile/"
[ -n "$collect" ] && echo "[gpu_check] copies of the small files in $collect"
exit $failed
