"""Prompt checkpoints: a damaged file is refused (checksum of the tensor data), and temporary
files of a killed save are cleaned up by the next one."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import promptmatch as pm

from conftest import make_backbone


def _model(seed=0):
    """The same frozen backbone every time; matchers and head initialised from ``seed``."""
    backbone = make_backbone("test_resnet", {}, seed=0)
    torch.manual_seed(seed)
    return pm.create_segmentor(backbone, "spm", 4, "linear").eval()


def _data_offset(raw: bytes) -> int:
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n


def test_checksum_is_stored_and_checked(tmp_path):
    model = _model()
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    meta = pm.read_prompt_metadata(path)
    assert meta["tensor_sha256"] == pm.checkpoint.tensor_checksum(model.trainable_state_dict())
    assert json.loads(path.with_suffix(".json").read_text())["tensor_sha256"] == meta["tensor_sha256"]
    fresh = _model(seed=1)
    pm.load_prompts(fresh, path)  # an intact file loads
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[k], v), k


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_bit_in_the_tensor_data_is_refused(tmp_path, where):
    model = _model()
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    raw = bytearray(path.read_bytes())
    start = _data_offset(raw)
    i = {"first": start, "middle": (start + len(raw)) // 2, "last": len(raw) - 1}[where]
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))
    target = _model(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(pm.PromptChecksumError, match="damaged or was altered.*Nothing was loaded"):
        pm.load_prompts(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched
    with pytest.raises(pm.PromptChecksumError, match="damaged or was altered"):
        pm.PromptBank(target.backbone).add("x", path)


def test_file_without_checksum_still_loads(tmp_path):
    """Checkpoints written before the checksum existed load as before."""
    from safetensors.torch import save_file

    model = _model()
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    meta = pm.read_prompt_metadata(path)
    del meta["tensor_sha256"]
    tensors = pm.checkpoint.read_prompt_tensors(path)
    save_file(tensors, str(path), metadata={"promptmatch": json.dumps(meta, sort_keys=True)})
    target = _model(seed=1)
    assert any(not torch.equal(target.trainable_state_dict()[k], v) for k, v in tensors.items())
    loaded_meta = pm.load_prompts(target, path)
    assert "tensor_sha256" not in loaded_meta
    own = target.trainable_state_dict()
    assert sorted(own) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(own[k], v), k


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path):
    model = _model()
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".p.safetensors.pid{dead}.abc123.tmp"  # its process has ended
    alive = tmp_path / f".p.safetensors.pid{os.getpid()}.def456.tmp"  # a write still in flight
    old = tmp_path / ".p.safetensors.legacy.tmp"  # no pid, written long ago
    for f in (stale, alive, old):
        f.write_bytes(b"partial")
    os.utime(old, (1, 1))
    other = tmp_path / ".q.safetensors.pid1.x.tmp"  # another checkpoint's file is not ours to remove
    other.write_bytes(b"partial")
    pm.save_prompts(model, path)
    assert not stale.exists() and not old.exists()
    assert alive.exists() and other.exists()
    assert not [p for p in tmp_path.glob(".p.safetensors.pid*.tmp") if p != alive]
