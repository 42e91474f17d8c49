"""The prompted core both segmentors share: the checkpoint interface, and a failed
construction leaving the backbone as it was given."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import promptmatch as pm

from conftest import make_backbone
from method_contract import CONTRACT_BACKBONES, applies

VIT = CONTRACT_BACKBONES[0]
assert VIT.name == "test_vit"
#: every registered method that applies to the ViT, except those whose attachment cannot be
#: undone: peft's LoRA injection (the one method that renames backbone keys) has no detach
UNDOABLE = [m for m in pm.list_methods() if applies(m, VIT) and not pm.get_method(m).renames_backbone_keys]


def test_undoable_methods_cover_the_built_in_ones():
    assert {"linear", "spm", "bitfit", "full", "vpt", "adaptformer"} <= set(UNDOABLE)


@pytest.mark.parametrize("method", UNDOABLE)
def test_failed_construction_leaves_the_backbone_as_given(method):
    backbone = make_backbone("test_vit", {})
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in backbone.named_parameters()}
    modules = {n for n, _ in backbone.named_modules()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in backbone.modules())
    with pytest.raises(ValueError, match="bad decoder_cfg"):  # fails after staging and attaching the method
        pm.create_segmentor(backbone, method, 4, "multilevel", decoder_cfg={"no_such_option": 1})
    assert getattr(backbone, "_promptmatch_staged", None) is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in backbone.modules()) == hooks
    assert {n for n, _ in backbone.named_modules()} == modules
    for n, p in backbone.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1]), n
    # and it can be prompted afterwards as if nothing had happened
    model = pm.create_segmentor(backbone, method, 4, "linear")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_checkpoint_interface_is_declared(tmp_path):
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 4)
    assert isinstance(model, pm.PromptCheckpointable)
    assert not isinstance(nn.Linear(2, 2), pm.PromptCheckpointable)
    with pytest.raises(TypeError, match="needs a prompted model .*PromptCheckpointable.*Linear"):
        pm.save_prompts(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_multilevel_decoder_reads_only_its_levels(tmp_path):
    """``decoder_cfg={"levels": ...}``: a backbone staged finer than the decoder reads (every
    block a stage, four of them read); the other stages' features never reach the head, SPM
    gives them no decoder prompt, and the levels are part of what a checkpoint must match."""
    images = torch.randn(2, 3, 64, 64)
    model = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "multilevel",
                                decoder_cfg={"levels": [1, -1]})
    n = len(model.staged.stages)
    assert model.decode_head.stages_read(n) == (1, n - 1) and len(model.decode_head.proj) == 2
    # observers' decoder prompts only where the head reads (1); the last stage prompts anyway
    assert set(model.method.out_proj.keys()) == {"1", str(n - 1)}
    feats, _ = model.forward_features(images)
    poked = [f.clone() for f in feats]
    poked[0] += 1.0  # a level the head does not read
    torch.testing.assert_close(model.decode_head(poked), model.decode_head(feats), rtol=0, atol=0)
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    every = pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "multilevel")
    with pytest.raises(pm.PromptMismatchError, match="decoder_config"):
        pm.load_prompts(every, path)
    for bad in ([], [0, 0], [9], "1"):
        with pytest.raises(ValueError, match="levels"):
            pm.create_segmentor(make_backbone("test_resnet", {}), "spm", 3, "multilevel", decoder_cfg={"levels": bad})


def test_linear_decoder_without_its_batchnorm():
    """``decoder_cfg={"norm": False}``: dropout + 1x1 on the last stage (mmseg's FCNHead without
    convolutions); the default keeps the BatchNorm, so saved checkpoints keep their keys."""
    plain = pm.create_segmentor("test_resnet", "linear", 3, "linear", decoder_cfg={"norm": False, "dropout": 0.1})
    default = pm.create_segmentor("test_resnet", "linear", 3, "linear")
    plain_keys = set(plain.decode_head.state_dict())
    assert not any(k.startswith("norm.") for k in plain_keys)
    assert set(default.decode_head.state_dict()) - plain_keys == {k for k in default.decode_head.state_dict()
                                                                if k.startswith("norm.")} != set()
    assert plain(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_linear_decoder_classifier_init_std():
    """``init_std``: mmseg's classifier initialisation (normal, zero bias), the cause of the
    linear-probe gap between the folder and mmseg engines (docs/benchmark.md); None keeps
    PyTorch's uniform default, so earlier runs reproduce."""
    torch.manual_seed(0)
    head = pm.create_segmentor("test_resnet", "linear", 8, "linear", decoder_cfg={"init_std": 0.01}).decode_head
    w = head.classifier.weight.detach()
    assert float(w.std()) == pytest.approx(0.01, rel=0.2) and not head.classifier.bias.detach().any()
    torch.manual_seed(0)
    default = pm.create_segmentor("test_resnet", "linear", 8, "linear").decode_head.classifier
    assert default.bias.detach().any() and float(default.weight.detach().abs().max()) > 0.05
    with pytest.raises(ValueError, match="init_std must be None or a positive number"):
        pm.LinearDecoderConfig(init_std=-1.0)


def test_data_parallel_replica_is_refused_with_the_alternative():
    """``nn.DataParallel`` runs replicas made by ``Module._replicate_for_data_parallel`` (what
    ``torch.nn.parallel.replicate`` calls per device): they would share the original's staged
    backbone, so a replica's pass is refused; the original keeps working."""
    model = pm.create_segmentor(make_backbone("test_vit", {}), "spm", 4, "linear").eval()
    x = torch.randn(1, 3, 64, 64)
    replica = model._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DataParallel.*DistributedDataParallel"):
        replica(x)
    with pytest.raises(RuntimeError, match="DataParallel"), replica.prompted_session(x):
        pass
    with torch.no_grad():
        assert model(x).shape == (1, 4, 64, 64)
