"""Merged segmentor files (backbone + prompts in one safetensors) and the bank serving tool."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import promptmatch as pm
from promptmatch.merged import (
    MergedChecksumError,
    MergedSegmentorError,
    load_segmentor,
    read_segmentor_metadata,
    save_segmentor,
)

ROOT = Path(__file__).resolve().parents[1]


def _segmentor(backbone: str, method: str, seed: int = 0, **kw) -> pm.PromptSegmentor:
    """A tiny segmentor whose every weight is perturbed (so zero-initialised parts like LoRA's B matter)."""
    torch.manual_seed(seed)
    seg = pm.create_segmentor(backbone, method, 3, class_names=["a", "b", "c"], **kw)
    with torch.no_grad():
        for p in seg.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return seg.eval()


def _logits(seg: torch.nn.Module, side: int = 64) -> torch.Tensor:
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return seg(x)


def _rewrite(path: Path, tensors: dict, *, fix_record: bool) -> None:
    """Rewrite a merged file with other tensors; ``fix_record``: update its record and checksum
    to match them (a consistent file of another model), else keep the original record."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from promptmatch.checkpoint import tensor_checksum

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["promptmatch_segmentor"])
    if fix_record:
        meta["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
        meta["tensor_sha256"] = tensor_checksum(tensors)
    save_file(tensors, str(path), metadata={"promptmatch_segmentor": json.dumps(meta)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved test_resnet/spm merged file and the logits of the model it came from."""
    seg = _segmentor("test_resnet", "spm")
    path = tmp_path_factory.mktemp("merged") / "seg.safetensors"
    save_segmentor(seg, path, extra={"note": "fixture"})
    return path, _logits(seg)


@pytest.mark.parametrize("method", ["spm", "lora", "linear", "full"])
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_round_trip_exact(tmp_path, backbone, method):
    if method == "lora" and importlib.util.find_spec("peft") is None:
        pytest.skip("peft not installed")
    seg = _segmentor(backbone, method)
    want = _logits(seg)
    path = save_segmentor(seg, tmp_path / "m.safetensors")
    assert (tmp_path / "m.json").is_file()
    rng = torch.get_rng_state()
    loaded = load_segmentor(path)
    assert torch.equal(torch.get_rng_state(), rng), "loading must not disturb the caller's random state"
    assert isinstance(loaded, pm.PromptSegmentor) and not loaded.training
    assert torch.equal(_logits(loaded), want)
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.describe() == seg.describe()
    meta = read_segmentor_metadata(path)
    assert meta["backbone"]["timm_name"].split(".")[0] == backbone
    assert meta["segmentor"]["method"] == method
    assert meta["timm_version"] and meta["library_version"] == pm.__version__
    # the prompt part of the merged file is exactly what a prompt checkpoint of the model holds
    pm.save_prompts(seg, tmp_path / "p.safetensors")
    assert meta["prompt_tensor_sha256"] == pm.read_prompt_metadata(tmp_path / "p.safetensors")["tensor_sha256"]


def test_prompt_checkpoint_of_loaded_model_fits_a_fresh_backbone(tmp_path, saved):
    """The prompts of a loaded merged model, saved as a prompt checkpoint, load onto a freshly
    built segmentor whose backbone has the same weights, and give the same logits."""
    from safetensors.torch import load_file

    path, want = saved
    loaded = load_segmentor(path)
    assert torch.equal(_logits(loaded), want)
    prompts = pm.save_prompts(loaded, tmp_path / "p.safetensors")
    backbone = pm.create_backbone("test_resnet", pretrained=False)
    backbone_weights = {k[len("backbone."):]: v for k, v in load_file(str(path)).items() if k.startswith("backbone.")}
    backbone.load_state_dict(backbone_weights, strict=True)
    torch.manual_seed(7)  # matchers and head initialised unlike the saved ones
    fresh = pm.create_segmentor(backbone, "spm", 3, class_names=["a", "b", "c"]).eval()
    assert not torch.equal(_logits(fresh), want)
    pm.load_prompts(fresh, prompts)
    assert torch.equal(_logits(fresh), want)


def test_tampered_tensor_is_a_checksum_error(tmp_path, saved):
    from safetensors.torch import load_file

    path = tmp_path / "t.safetensors"
    path.write_bytes(saved[0].read_bytes())
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("backbone.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 1e-3
    _rewrite(path, tensors, fix_record=False)
    with pytest.raises(MergedChecksumError, match="checksum") as e:
        load_segmentor(path)
    assert isinstance(e.value, pm.PromptChecksumError)


def test_prompt_checkpoint_is_refused_with_a_hint(tmp_path):
    seg = _segmentor("test_resnet", "spm")
    pm.save_prompts(seg, tmp_path / "p.safetensors")
    with pytest.raises(MergedSegmentorError, match="prompt checkpoint.*load_prompts"):
        load_segmentor(tmp_path / "p.safetensors")
    save_segmentor(seg, tmp_path / "m.safetensors")  # and the other way round
    with pytest.raises(pm.PromptMismatchError, match="merged segmentor.*load_segmentor"):
        pm.load_prompts(_segmentor("test_resnet", "spm"), tmp_path / "m.safetensors")


def test_plain_safetensors_and_wrong_suffix_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MergedSegmentorError, match="not a promptmatch merged segmentor"):
        load_segmentor(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        load_segmentor(tmp_path / "plain.pt")


def test_missing_tensor_is_refused(tmp_path, saved):
    from safetensors.torch import load_file

    path = tmp_path / "m.safetensors"
    path.write_bytes(saved[0].read_bytes())
    tensors = load_file(str(path))
    del tensors["decode_head.classifier.weight"]
    _rewrite(path, tensors, fix_record=True)  # a consistent file, but not of the model its record describes
    with pytest.raises(MergedSegmentorError, match="missing tensors.*decode_head.classifier.weight"):
        load_segmentor(path)


def test_record_that_disagrees_with_tensors_is_refused(tmp_path, saved):
    from safetensors.torch import load_file

    from promptmatch.checkpoint import tensor_checksum

    path = tmp_path / "m.safetensors"
    path.write_bytes(saved[0].read_bytes())
    tensors = load_file(str(path))
    tensors["extra.tensor"] = torch.zeros(3)
    _rewrite(path, tensors, fix_record=False)
    # fix only the checksum: the tensor list in the record still differs
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["promptmatch_segmentor"])
    meta["tensor_sha256"] = tensor_checksum(tensors)
    save_file(tensors, str(path), metadata={"promptmatch_segmentor": json.dumps(meta)})
    with pytest.raises(MergedSegmentorError, match="extra.tensor"):
        load_segmentor(path)


def test_wrong_shape_is_refused(tmp_path, saved):
    from safetensors.torch import load_file

    path = tmp_path / "m.safetensors"
    path.write_bytes(saved[0].read_bytes())
    tensors = load_file(str(path))
    key = "decode_head.classifier.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    _rewrite(path, tensors, fix_record=True)
    with pytest.raises(MergedSegmentorError, match="shape mismatches.*decode_head.classifier.weight"):
        load_segmentor(path)


def test_loading_never_downloads(tmp_path, saved, monkeypatch):
    """Even where downloads are allowed, the timm model is made with pretrained=False and no
    download function or socket is touched."""
    import socket

    import timm

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("PROMPTMATCH_ALLOW_DOWNLOAD", "1")
    calls = []

    def forbidden(*a, **k):
        calls.append(a)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    real_create = timm.create_model
    pretrained_flags = []

    def spy(*a, **k):
        pretrained_flags.append(k.get("pretrained", False))
        return real_create(*a, **k)

    monkeypatch.setattr(timm, "create_model", spy)
    path, want = saved
    loaded = load_segmentor(path)
    assert pretrained_flags and not any(pretrained_flags) and not calls
    assert torch.equal(_logits(loaded), want)


def test_save_refuses_a_backbone_it_cannot_rebuild(tmp_path):
    kw = dict(depth=2, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    seg = pm.create_segmentor("deit_tiny_patch16_224", "linear", 3, backbone_kwargs=kw).eval()
    path = tmp_path / "d.safetensors"
    auto = save_segmentor(seg, tmp_path / "auto.safetensors")  # create_backbone recorded its kwargs
    assert torch.equal(_logits(load_segmentor(auto)), _logits(seg))
    for p in tmp_path.iterdir():
        p.unlink()
    del seg.backbone._promptmatch_backbone_kwargs  # a timm model built some other way
    with pytest.raises(MergedSegmentorError, match="backbone_kwargs"):
        save_segmentor(seg, path)
    assert not path.exists() and not list(tmp_path.iterdir()), "nothing may be written"
    save_segmentor(seg, path, backbone_kwargs=kw)
    assert torch.equal(_logits(load_segmentor(path)), _logits(seg))
    assert read_segmentor_metadata(path)["backbone"]["kwargs"] == kw


def test_failed_save_keeps_the_existing_file(tmp_path, saved):
    path = tmp_path / "m.safetensors"
    path.write_bytes(saved[0].read_bytes())
    seg = _segmentor("test_resnet", "spm")
    with torch.no_grad():
        seg.decode_head.classifier.weight.fill_(float("nan"))
    with pytest.raises(pm.NonFiniteError, match=r"not writing merged segmentor .*decode_head\.classifier\.weight.*"
                                                 "The existing file was left as it was"):
        save_segmentor(seg, path)
    assert torch.equal(_logits(load_segmentor(path)), saved[1])


def test_save_refuses_a_backbone_that_is_not_timm(tmp_path):
    bb = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1))
    seg = pm.create_segmentor(bb, "linear", 3, stage_modules=["0", "1"])
    with pytest.raises(MergedSegmentorError, match="not a timm model.*save_prompts"):
        save_segmentor(seg, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_refuses_non_segmentor():
    with pytest.raises(TypeError, match="PromptSegmentor"):
        save_segmentor(torch.nn.Linear(2, 2), "x.safetensors")


# ----------------------------------------------------------------------------- the tool
def _load_tool():
    from promptmatch.tools import bank_serving

    return bank_serving


def test_bank_serving_tool_tiny(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "r.json"
    rc = tool.main(["--backbone", "test_resnet", "--size", "32", "--classes", "3", "--requests", "3",
                    "--repeats", "1", "--warmup", "0", "--datasets", "1", "2", "--no-isolate",
                    "--workdir", str(tmp_path / "art"), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["datasets"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(1, "bank"), (1, "per_model"), (2, "bank"), (2, "per_model")}
    for r in rows.values():
        assert r["requests_per_s"] > 0 and r["param_mb"] > 0 and r["requests"] == 3
    # the bank stores the backbone once: two datasets cost less than two full models
    assert rows[(2, "bank")]["param_mb"] < rows[(2, "per_model")]["param_mb"]
    assert rows[(2, "bank")]["prediction_digests"] == rows[(2, "per_model")]["prediction_digests"]
    assert "| datasets |" in capsys.readouterr().out and "| 2 |" in data["table"]


def test_request_stream_orders():
    tool = _load_tool()
    assert tool.request_stream(3, 7, "rr", 0) == [0, 1, 2, 0, 1, 2, 0]
    s = tool.request_stream(4, 50, "random", 1)
    assert s == tool.request_stream(4, 50, "random", 1) and set(s) <= set(range(4))
