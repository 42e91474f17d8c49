"""Public API behaviour: bad input, mismatched checkpoints, weights, prompt bank, hygiene."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import promptmatch as pm

from conftest import make_backbone, make_batch

REPO = Path(__file__).resolve().parents[1]


def vit(seed=0, **kw):
    return make_backbone("test_vit", kw, seed=seed)


def resnet(seed=0):
    return make_backbone("test_resnet", {}, seed=seed)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="nope"), ValueError, "unknown method 'nope'.*spm"),
        (dict(decoder="mlp"), ValueError, "unknown decoder 'mlp'.*linear"),
        (dict(num_classes=0), ValueError, "num_classes must be a positive int"),
        (dict(num_classes=-3), ValueError, "num_classes must be a positive int"),
        (dict(num_classes=2.5), ValueError, "num_classes must be a positive int"),
        (dict(method_cfg=dict(hidden_dim=0)), ValueError, "hidden_dim must be a positive int"),
        (dict(method_cfg=dict(iterations=0)), ValueError, "iterations must be an int >= 1"),
        (dict(method_cfg=dict(boundaries=(0, 9))), ValueError, r"boundaries \[9\] out of range"),
        (dict(method_cfg=dict(colour="red")), ValueError, "unknown fields \\['colour'\\]"),
        (dict(method_cfg=dict(interim_loss_weight=-1)), ValueError, "interim_loss_weight must be >= 0"),
        (dict(class_names=["a", "b"]), ValueError, "2 class_names for num_classes=4"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    args = dict(method="spm", num_classes=4, decoder="linear")
    args.update(kwargs)
    backbone = resnet()
    with pytest.raises(exc, match=match):
        pm.create_segmentor(backbone, **args)
    # a failed build leaves the module unstaged, so it can be used again
    assert getattr(backbone, "_promptmatch_staged", None) is None
    pm.create_segmentor(backbone, num_classes=4)


def test_bad_images_and_labels():
    model = pm.create_segmentor(vit(), num_classes=4)
    cnn = pm.create_segmentor(resnet(), num_classes=4)
    images, labels = make_batch(64)
    cases = [
        (lambda: model(images[0]), ValueError, r"shape \(N, C, H, W\)"),
        (lambda: model(images[:, :1]), ValueError, "1 channels but the backbone expects 3"),
        (lambda: model(torch.randn(1, 3, 72, 64)), ValueError, "not divisible by the patch size 16x16"),
        (lambda: cnn(torch.randn(1, 3, 16, 16)), ValueError, "smaller than the backbone's largest stride 32"),
        (lambda: model.loss(images, labels[:, :32]), ValueError, r"labels have shape \(2, 32, 64\)"),
        (lambda: model.loss(images, labels[:, None]), ValueError, "squeeze the channel dim"),
        (lambda: model.loss(images, labels.float()), TypeError, "integer tensor"),
        (lambda: model.loss(images, labels + 10), ValueError, "outside \\[0, 4\\)"),
        (lambda: model("image.png"), TypeError, "must be a torch.Tensor"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def _loss_keys(model):
    return {"loss_decode"} | {f"loss_interim_{b}" for b in model.method.boundary_indices}


def test_ignore_index_is_respected():
    model = pm.create_segmentor(resnet(), num_classes=4)
    images, labels = make_batch(64)
    # an all-ignored batch carries no signal: no interim loss, no gradient anywhere
    losses = model.loss(images, torch.full_like(labels, 255))
    assert set(losses) == _loss_keys(model)
    for k, v in losses.items():
        if k != "loss_decode":  # loss_decode: see test_all_ignored_batch_gives_finite_losses
            assert v.item() == 0.0, (k, v)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    for n, g in grads.items():
        assert torch.isfinite(g).all() and not g.any(), f"{n} learns from ignored pixels"
    # half the pixels ignored: finite, positive losses, the decode loss over the other half only
    part = labels.clone()
    part[:, :32] = 255
    losses = model.loss(images, part)
    assert set(losses) == _loss_keys(model)
    for k, v in losses.items():
        assert torch.isfinite(v) and v.item() > 0, (k, v)
    b = torch.nn.functional.cross_entropy(model(images), part, ignore_index=255)
    torch.testing.assert_close(losses["loss_decode"], b)


def test_all_ignored_batch_gives_finite_losses():
    """A crop with no labelled pixel is a normal batch (zero loss), not a diverged step."""
    model = pm.create_segmentor(resnet(), num_classes=4)
    images, labels = make_batch(64)
    losses = model.loss(images, torch.full_like(labels, 255))
    assert set(losses) == _loss_keys(model)
    for k, v in losses.items():
        assert torch.isfinite(v) and v == 0, (k, v)
    sum(losses.values()).backward()  # the graph is kept: a training step goes through


def test_vit_takes_any_size_divisible_by_patch():
    model = pm.create_segmentor(vit(), num_classes=3).eval()
    for h, w in [(64, 64), (48, 80), (96, 32)]:
        assert model(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)


def test_fixed_size_vit_module_gets_clear_error():
    import timm

    backbone = timm.create_model("test_vit", num_classes=0, dynamic_img_size=False)
    model = pm.create_segmentor(backbone, num_classes=3)
    with pytest.raises(ValueError, match="built for 160x160 inputs only.*dynamic_img_size=True"):
        model(torch.randn(1, 3, 64, 64))
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 3, 160, 160)


# ------------------------------------------------------------------------ stage modules
class NoInfoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_model_without_feature_info():
    with pytest.raises(ValueError, match="no usable `feature_info`.*stage_modules="):
        pm.create_segmentor(NoInfoNet(), num_classes=3)
    model = pm.create_segmentor(NoInfoNet(), num_classes=3, stage_modules=["a", "b", "c"])
    assert [(s.channels, s.reduction) for s in model.staged.stages] == [(8, 2), (16, 4), (32, 8)]
    images, labels = make_batch(32, num_classes=3)
    sum(model.loss(images, labels).values()).backward()
    with pytest.raises(ValueError, match=r"\['zz'\] are not submodules"):
        pm.create_segmentor(NoInfoNet(), num_classes=3, stage_modules=["a", "zz"])


def test_explicit_stage_modules_on_timm_model():
    model = pm.create_segmentor(resnet(), num_classes=3, stage_modules=["layer2", "layer4"])
    assert [s.module for s in model.staged.stages] == ["layer2", "layer4"]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_vit_num_stages():
    model = pm.create_segmentor(vit(), num_classes=3, num_stages=3)
    assert [s.module for s in model.staged.stages] == ["blocks.1", "blocks.3", "blocks.5"]
    with pytest.raises(ValueError, match="num_stages must be in"):
        pm.create_segmentor(vit(), num_classes=3, num_stages=7)


def test_gradient_checkpointing_does_not_break_stages():
    backbone = vit()
    model = pm.create_segmentor(backbone, num_classes=3)
    images, labels = make_batch(64, num_classes=3)
    with torch.no_grad():  # matchers that are not the identity, so gradients reach them all
        for proj in model.method.out_proj.values():
            proj.weight.normal_(0, 0.1)
    model.eval()  # decoder BatchNorm statistics stay fixed, so outputs can be compared
    ref = model(images)
    sum(model.loss(images, labels).values()).backward()
    ref_grad = model.method.in_proj["0"].weight.grad.clone()
    assert float(ref_grad.abs().max()) > 0
    model.zero_grad()
    backbone.set_grad_checkpointing(True)
    sum(model.loss(images, labels).values()).backward()
    assert not backbone.grad_checkpointing
    torch.testing.assert_close(model.method.in_proj["0"].weight.grad, ref_grad)
    torch.testing.assert_close(model(images), ref)


def test_batchnorm_frozen_after_train_call_on_backbone_itself():
    model = pm.create_segmentor(resnet(), num_classes=3)
    model.backbone.train()  # a user (or a framework) flips the backbone to train mode
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images, labels = make_batch(64, num_classes=3)
    model.loss(images, labels)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved(tmp_path):
    model = pm.create_segmentor(vit(), "spm", 4, "linear", class_names=list("abcd"))
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    return model, path


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: pm.create_segmentor(resnet(), "spm", 4, "linear"), "backbone.architecture"),
        (lambda: pm.create_segmentor(vit(seed=5), "spm", 4, "linear"), "backbone.fingerprint"),
        (lambda: pm.create_segmentor(vit(), "spm", 5, "linear"), "num_classes"),
        (lambda: pm.create_segmentor(vit(), "spm", 4, "linear", class_names=list("wxyz")), "class_names"),
        (lambda: pm.create_segmentor(vit(), "spm", 4, "linear", method_cfg=dict(hidden_dim=32)), "method_config.hidden_dim"),
        (lambda: pm.create_segmentor(vit(), "spm", 4, "linear", method_cfg=dict(recurrent=False)), "method_config.recurrent"),
        (lambda: pm.create_segmentor(vit(), "spm", 4, "multilevel"), "decoder"),
        (lambda: pm.create_segmentor(vit(), "spm", 4, "linear", num_stages=2), "backbone.stage_modules"),
    ],
)
def test_mismatched_prompts_are_refused_untouched(saved, build, field):
    _, path = saved
    other = build()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(pm.PromptMismatchError, match=field.replace(".", r"\.")):
        pm.load_prompts(other, path)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


def test_checkpoint_files_and_metadata(saved):
    model, path = saved
    # no pickle: the file is plain safetensors (u64 little-endian header length, a JSON header
    # of tensor entries and string metadata, then exactly the tensors' bytes), nothing else
    raw = path.read_bytes()
    assert not raw.startswith((b"PK", b"\x80")), "zip (torch.save) or pickle magic at the start"
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw)
    header = json.loads(raw[8 : 8 + n])
    assert set(header["__metadata__"]) == {"promptmatch"}
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(entries) == set(model.trainable_state_dict())
    spans = sorted(tuple(e["data_offsets"]) for e in entries.values())
    for e in entries.values():
        assert set(e) == {"dtype", "shape", "data_offsets"}, e
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == len(raw) - 8 - n, "bytes beyond the tensors"
    # not a pickle: the file starts with the header length (the error pickle reports depends on
    # which opcode, if any, its low byte happens to be: an unknown one, or e.g. INT reading junk)
    with pytest.raises((pickle.UnpicklingError, ValueError, EOFError)):
        pickle.loads(raw)
    with pytest.raises(pickle.UnpicklingError, match=r"(?s)Weights only load failed"):
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)  # bytes: a path would go to safetensors
    assert path.with_suffix(".json").is_file()
    meta = pm.read_prompt_metadata(path)
    assert meta["method"] == "spm" and meta["num_classes"] == 4 and meta["class_names"] == list("abcd")
    assert meta["library_version"] == pm.__version__
    assert meta["backbone"]["architecture"] == "test_vit"
    assert meta["backbone"]["fingerprint"] == pm.backbone_fingerprint(model)


def test_tampered_tensor_shapes_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, path = saved
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if k.startswith("method.in_proj"))
    tensors[key] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    model = pm.create_segmentor(vit(), "spm", 4, "linear", class_names=list("abcd"))
    with pytest.raises(pm.PromptChecksumError, match="damaged or was altered"):
        pm.load_prompts(model, bad)  # the stored checksum no longer fits the tensors
    # with a consistent checksum (a file made by other code) the shapes are still checked
    record = json.loads(meta["promptmatch"])
    record["tensor_sha256"] = pm.checkpoint.tensor_checksum(tensors)
    save_file(tensors, str(bad), metadata={"promptmatch": json.dumps(record)})
    with pytest.raises(pm.PromptMismatchError, match="shape mismatches"):
        pm.load_prompts(model, bad)


def test_not_a_prompt_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = pm.create_segmentor(vit(), num_classes=4)
    plain = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(pm.PromptMismatchError, match="not a promptmatch prompt checkpoint"):
        pm.load_prompts(model, plain)
    with pytest.raises(FileNotFoundError, match="prompt checkpoint .*missing.safetensors' does not exist"):
        pm.load_prompts(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors files"):
        pm.save_prompts(model, tmp_path / "x.pt")


def test_failed_write_keeps_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    original = path.read_bytes()
    with torch.no_grad():
        model.decode_head.classifier.bias.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_prompts(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_prompt_bank_switches_datasets_exactly(tmp_path):
    backbone = vit()
    images, _ = make_batch(64)
    refs, paths = {}, {}
    for i, (name, k) in enumerate([("a", 3), ("b", 5), ("c", 3)]):
        torch.manual_seed(100 + i)
        seg = pm.create_segmentor(backbone, "spm", k, "multilevel" if name == "b" else "linear")
        with torch.no_grad():
            for p in seg.method.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        seg.eval()
        with torch.no_grad():
            refs[name] = seg(images)
        paths[name] = pm.save_prompts(seg, tmp_path / f"{name}.safetensors")
    bank = pm.PromptBank(backbone).eval()
    for name, path in paths.items():
        bank.add(name, path)
    with torch.no_grad():
        for name in ["b", "a", "c", "a", "b"]:
            torch.testing.assert_close(bank(images, name), refs[name], rtol=0, atol=0)
    assert bank.segmentor("a").backbone is bank.segmentor("b").backbone is backbone
    assert sum(1 for m in bank.modules() if m is backbone) == 1
    with pytest.raises(KeyError, match="no dataset 'zz'"):
        bank(images, "zz")


# ------------------------------------------------------------------------------ weights
def test_pretrained_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t0 = time.monotonic()
    with pytest.raises(pm.WeightsNotFoundError, match="not available offline.*weights='/path/to/"):
        pm.create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_through_timm_filter(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", num_classes=10)  # has a classifier: filtered/adapted by timm
    state = src.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = pm.create_segmentor("test_resnet", num_classes=3, weights=str(path))
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    with pytest.raises(pm.WeightsNotFoundError, match="does not exist"):
        pm.create_backbone("test_resnet", weights=str(tmp_path / "nope.pth"))


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        pm.create_segmentor("resnet_nope", num_classes=3)


# ------------------------------------------------------------------------------ hygiene
def test_import_is_silent_and_light_without_optional_extras():
    code = (
        "import sys\n"
        "for m in ('mmseg', 'mmcv', 'mmengine', 'peft'):\n"
        "    sys.modules[m] = None  # simulate: not installed\n"
        "import promptmatch as pm\n"
        "heavy = [m for m in ('mmseg', 'mmcv', 'mmengine', 'peft', 'transformers') if sys.modules.get(m) is not None]\n"
        "assert not heavy, heavy\n"
        "m = pm.create_segmentor('test_resnet', num_classes=2)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)


def test_public_api_surface():
    for name in pm.__all__:
        assert hasattr(pm, name), name
    assert "spm" in pm.list_methods()
    assert set(pm.list_decoders()) >= {"linear", "multilevel"}


def test_parameter_report():
    model = pm.create_segmentor(resnet(), num_classes=4)
    rep = pm.parameter_report(model)
    assert rep.components["backbone"]["trainable"] == 0
    assert rep.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.frozen == sum(p.numel() for p in model.backbone.parameters())
    assert "decode_head" in str(rep) and rep.as_dict()["trainable"] == rep.trainable
