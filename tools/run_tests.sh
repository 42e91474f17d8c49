#!/usr/bin/env bash
# The whole test suite on a fresh or an existing checkout: sets up .venv (see
# tools/setup_env.sh; the first run builds mmcv, ~22 min) and runs pytest on tests/,
# the slow integration tests included. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/setup_env.sh"
cd "$repo"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PROMPTMATCH_VENV:-$repo/.venv}/bin/python" -m pytest tests "$@"
