#!/usr/bin/env bash
# The whole test suite on a fresh or an existing checkout: sets up .venv with everything
# (tools/setup_env.sh --all: the demo's stack plus the mmseg stack; the first run builds
# mmcv, ~25-35 min on 2 cores) and runs pytest on tests/, the slow integration tests
# included. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/setup_env.sh" --all
cd "$repo"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PROMPTMATCH_VENV:-$repo/.venv}/bin/python" -m pytest tests "$@"
