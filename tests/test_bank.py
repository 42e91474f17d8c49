"""PromptBank with every registered method: checkpoints that may share one frozen backbone give
each its own model's logits whatever was loaded beside them; the others are refused, and the
bank stays usable."""
from __future__ import annotations

import pytest
import torch

import promptmatch as pm
from promptmatch.methods import get_method, list_methods

from conftest import make_backbone, make_batch

NUM_CLASSES = 4
TOKEN_ONLY = {"vpt", "mona", "rein", "adaptformer"}  # refused on a CNN (MethodNotApplicableError)


def _checkpoint(method, backbone, tmp_path, tag, seed):
    """A prompt checkpoint of ``method`` moved off its initialisation, and its model's logits."""
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(backbone, {}, seed=0), method, NUM_CLASSES, "multilevel")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    images, _ = make_batch(64, n=1)
    with torch.no_grad():
        logits = model.eval()(images)
    return pm.save_prompts(model, tmp_path / f"{tag}.safetensors"), logits


CASES = [(m, b) for m in list_methods() for b in ("test_vit", "test_resnet")
         if not (b == "test_resnet" and m in TOKEN_ONLY)]


@pytest.mark.parametrize("method,backbone", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_bank_serves_or_refuses_each_method(method, backbone, tmp_path):
    images, _ = make_batch(64, n=1)
    a, ref_a = _checkpoint(method, backbone, tmp_path, "a", seed=1)
    b, ref_b = _checkpoint(method, backbone, tmp_path, "b", seed=2)
    spm, ref_spm = _checkpoint("spm", backbone, tmp_path, "spm", seed=3)
    bank = pm.PromptBank(make_backbone(backbone, {}, seed=0)).eval()
    bank.add("a", a)
    if get_method(method).shares_backbone:
        bank.add("b", b)
        bank.add("spm", spm)
        refs = {"a": ref_a, "b": ref_b, "spm": ref_spm}
    else:
        for name, path in (("b", b), ("spm", spm)):
            with pytest.raises(ValueError, match="changes the backbone itself for every pass"):
                bank.add(name, path)
        refs = {"a": ref_a}
    assert sorted(bank.names()) == sorted(refs)
    with torch.no_grad():
        for name in reversed(sorted(refs)):  # not the order of loading
            torch.testing.assert_close(bank(images, name), refs[name], rtol=0, atol=0)


def test_a_bank_with_a_shared_checkpoint_refuses_one_that_changes_the_backbone(tmp_path):
    """The other way round: lora after an spm file would change the spm dataset's backbone."""
    spm, ref_spm = _checkpoint("spm", "test_vit", tmp_path, "spm", seed=3)
    lora, _ = _checkpoint("lora", "test_vit", tmp_path, "lora", seed=1)
    backbone = make_backbone("test_vit", {}, seed=0)
    bank = pm.PromptBank(backbone).eval()
    bank.add("spm", spm)
    keys = sorted(backbone.state_dict())
    with pytest.raises(ValueError, match="its method 'lora' changes the backbone itself.*PromptBank"):
        bank.add("lora", lora)
    assert sorted(backbone.state_dict()) == keys  # refused before peft touched the backbone
    images, _ = make_batch(64, n=1)
    with torch.no_grad():
        torch.testing.assert_close(bank(images, "spm"), ref_spm, rtol=0, atol=0)


def test_hooks_act_only_in_their_own_pass():
    """A hook-based method's hooks leave the shared backbone plain outside its segmentor's passes
    (a direct call of the backbone gives the frozen features)."""
    model = pm.create_segmentor(make_backbone("test_vit", {}, seed=0), "adaptformer", NUM_CLASSES, "linear")
    plain = make_backbone("test_vit", {}, seed=0).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1)
    images, _ = make_batch(64, n=1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.forward_features(images), plain.forward_features(images),
                                   rtol=0, atol=0)
        with model.method.acting():
            assert not torch.equal(model.backbone.forward_features(images), plain.forward_features(images))
