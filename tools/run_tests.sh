#!/usr/bin/env bash
# The whole test suite on a fresh or an existing checkout: sets up .venv with everything
# (tools/setup_env.sh --all: the demo's stack plus the mmseg stack; the first run builds
# mmcv, ~25-35 min on 2 cores) and .venv-main with the main install alone (the README's main
# set-up command: what a user's own folder needs, no mmcv, no mmseg; tests/test_main_install.py
# runs there), then runs pytest on tests/, the slow integration tests included. Extra
# arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/setup_env.sh" --all
export PROMPTMATCH_MAIN_VENV="${PROMPTMATCH_MAIN_VENV:-$repo/.venv-main}"
PROMPTMATCH_VENV="$PROMPTMATCH_MAIN_VENV" bash "$repo/tools/setup_env.sh"
cd "$repo"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PROMPTMATCH_VENV:-$repo/.venv}/bin/python" -m pytest tests "$@"
