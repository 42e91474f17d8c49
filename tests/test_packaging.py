"""A plain (non-editable) install: the wheel holds everything the entry points need, and they
run from a directory outside the source checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with promptmatch installed from its wheel (no editable hook), the other
    packages taken from this environment."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(REPO / "promptmatch", src / "promptmatch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         cwd=tmp)
    (wheel,) = (tmp / "dist").glob("promptmatch-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    # this environment's packages as a plain path entry: its .pth files (the editable hook) are not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", site, wheel], cwd=tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return py, site, elsewhere


def test_the_installed_package_is_the_wheel(installed):
    py, site, elsewhere = installed
    out = _run([py, "-c", "import promptmatch, promptmatch.benchmark as b; print(promptmatch.__file__); "
                "print(b.PROFILE_DIR); print(' '.join(b.list_profiles()))"], cwd=elsewhere).stdout.split("\n")
    assert Path(out[0]).is_relative_to(site) and Path(out[1]).is_relative_to(site)
    assert {"quick", "quick-vit", "full"} <= set(out[2].split())


def test_entry_points_run_outside_the_checkout(installed):
    py, site, elsewhere = installed
    res = _run([py, "-m", "promptmatch.benchmark", "--profile", "quick", "--list"], cwd=elsewhere)
    assert "quick: valid; 30 cells" in res.stdout
    res = _run([py, "-m", "promptmatch.benchmark", "--list-profiles"], cwd=elsewhere)
    assert "quick-vit" in res.stdout and str(site) in res.stdout
    res = _run([py, "-m", "promptmatch.demo", "--help"], cwd=elsewhere)
    assert "--dataset" in res.stdout and "--work-dir" in res.stdout
    assert not list(elsewhere.iterdir())  # listing and help write nothing
