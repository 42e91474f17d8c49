"""The split set-up: the demo's light default, ``--mmseg``/``--all`` for everything, and the
message that names the set-up command when the mmseg stack is missing. Installs nothing."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tools" / "setup_env.sh"
COMMAND = "bash tools/setup_env.sh --mmseg"
BASH = shutil.which("bash")

needs_bash = pytest.mark.skipif(BASH is None, reason="bash not found")

# a meta-path finder that makes the listed top-level packages look uninstalled
BLOCK = textwrap.dedent("""\
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    """)


def _setup(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROMPTMATCH_VENV=str(tmp_path / "venv"), PYTHON="/nonexistent/python3")
    return subprocess.run([BASH, str(SETUP), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def _python(code: str, blocked=("mmseg", "mmcv", "mmengine")) -> subprocess.CompletedProcess:
    src = BLOCK.format(blocked=set(blocked)) + textwrap.dedent(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", src], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@needs_bash
def test_setup_env_syntax():
    res = subprocess.run([BASH, "-n", str(SETUP)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_bash
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_names_both_modes_and_installs_nothing(flag, tmp_path):
    res = _setup(flag, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage: bash tools/setup_env.sh" in res.stdout
    for word in ("--mmseg", "--all", "tools/demo.py", "mmcv 2.1.0", "tools/run_tests.sh"):
        assert word in res.stdout
    assert not (tmp_path / "venv").exists()


@needs_bash
@pytest.mark.parametrize("args", [("--bogus",), ("--all", "extra")])
def test_unknown_argument_fails_with_usage(args, tmp_path):
    res = _setup(*args, tmp_path=tmp_path)
    assert res.returncode == 2
    assert f"unknown argument: {args[-1]}" in res.stderr
    assert "usage: bash tools/setup_env.sh" in res.stderr
    assert not (tmp_path / "venv").exists()


def test_run_tests_installs_everything():
    text = (REPO / "tools" / "run_tests.sh").read_text()
    assert 'tools/setup_env.sh" --all' in text


def test_import_promptmatch_without_mmseg_stack_is_silent():
    res = _python("""
        import sys
        import promptmatch, promptmatch.datasets, promptmatch.weights
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mmseg", "mmcv", "mmengine"))
        assert not loaded, loaded
        """)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


@pytest.mark.parametrize("blocked", [("mmseg", "mmcv", "mmengine"), ("mmcv",)], ids=["no-stack", "no-mmcv"])
def test_mmseg_import_error_names_the_command(blocked):
    if "mmengine" not in blocked and importlib.util.find_spec("mmengine") is None:
        pytest.skip("mmengine not installed")
    res = _python("""
        try:
            import promptmatch.mmseg
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("promptmatch.mmseg imported without the mmseg stack")
        """, blocked)
    assert res.returncode == 0, res.stderr
    assert COMMAND in res.stdout
    assert "mmcv 2.1.0" in res.stdout and "minutes" in res.stdout


def test_registry_import_error_names_the_command():
    res = _python("""
        try:
            import promptmatch.registry
        except ImportError as e:
            print(e)
        """)
    assert res.returncode == 0, res.stderr
    assert COMMAND in res.stdout


@pytest.mark.skipif(importlib.util.find_spec("mmengine") is None, reason="mmengine not installed")
def test_config_type_reaches_user_through_mmengine():
    """``type='promptmatch.PromptEncoderDecoder'`` with mmengine but without mmseg/mmcv:
    mmengine swallows the ImportError of ``promptmatch.registry``; the command is logged."""
    res = _python("""
        from mmengine.registry import MODELS
        MODELS.build(dict(type="promptmatch.PromptEncoderDecoder"))
        """, ("mmseg", "mmcv"))
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert COMMAND in out
    assert out.count(COMMAND) == 1, out
