"""Files are written with the user's umask (0644 under 022, 0600 under 077), as any other
program's files, and still atomically: a write that fails midway leaves the old file as it was
and no temporary file behind. Covers every writer on promptmatch._atomic: prompt checkpoints and
their .json, merged segmentor files, the prediction tools' PNGs and palette.json."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import promptmatch as pm
from promptmatch import _atomic
from promptmatch.visualize import MaskWriter, fixed_palette, write_palette

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda value: os.umask(value)
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def segmentor():
    torch.manual_seed(0)
    return pm.create_segmentor("test_resnet", "spm", 3).eval()


def _write_everything(seg, out: Path) -> list:
    ckpt = pm.save_prompts(seg, out / "prompts.safetensors")
    merged = pm.save_segmentor(seg, out / "seg.safetensors")
    writer = MaskWriter(out / "pred", fixed_palette(3))
    labels = np.random.default_rng(0).integers(0, 3, (8, 9))
    pngs = writer.write("img", labels, np.zeros((8, 9, 3), dtype=np.uint8))
    return [ckpt, ckpt.with_suffix(".json"), merged, merged.with_suffix(".json"), *pngs.values(),
            write_palette(out / "pred", ["a", "b", "c"], fixed_palette(3))]


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_mode(segmentor, tmp_path, umask, mask, want):
    umask(mask)
    files = _write_everything(segmentor, tmp_path)
    assert len(files) == 8
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(want) for f in files}
    # a second write replaces the files, with the same mode
    assert {oct(_mode(f)) for f in _write_everything(segmentor, tmp_path)} == {oct(want)}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_write_keeps_the_old_file(segmentor, tmp_path, umask, monkeypatch):
    path = pm.save_prompts(segmentor, tmp_path / "prompts.safetensors")
    before = path.read_bytes()
    with torch.no_grad():
        next(p for p in segmentor.parameters() if p.requires_grad).add_(1.0)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_atomic.os, "fsync", disk_full)  # the write fails before the rename
    with pytest.raises(OSError, match="No space left"):
        pm.save_prompts(segmentor, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.json", "prompts.safetensors"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path, umask):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with _atomic.atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o644
