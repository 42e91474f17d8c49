"""One matrix over backbone families: staging, freezing, SPM at init, training, checkpoints."""
from __future__ import annotations

import copy

import torch

import promptmatch as pm

from conftest import make_backbone, make_batch

NUM_CLASSES = 4


def _plain_boundary_maps(model, stage_modules, images, num_prefix):
    """Boundary outputs of an unstaged copy of the model, converted to NCHW independently."""
    outs = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o))
        for name in stage_modules
    ]
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for name, st in zip(stage_modules, stage_channels(model, stage_modules)):
        o = outs[name]
        if o.ndim == 3:
            n, length, c = o.shape
            side = int(round((length - num_prefix) ** 0.5))
            o = o[:, num_prefix:].transpose(1, 2).reshape(n, c, side, side)
        elif o.shape[1] != st:
            o = o.permute(0, 3, 1, 2)
        maps.append(o)
    return maps


def stage_channels(model, stage_modules):
    info = {f["module"]: f["num_chs"] for f in model.feature_info}
    return [info[n] for n in stage_modules]


def test_staged_features_equal_plain_and_spm_init(family):
    _, name, kwargs, side = family
    backbone = make_backbone(name, kwargs)
    plain = copy.deepcopy(backbone).eval()
    keys_before = list(backbone.state_dict().keys())
    model = pm.create_segmentor(backbone, "spm", NUM_CLASSES, "multilevel")
    assert model.backbone is backbone
    assert list(backbone.state_dict().keys()) == keys_before
    stage_modules = [s.module for s in model.staged.stages]
    assert len(stage_modules) >= 2
    images, _ = make_batch(side)
    want = _plain_boundary_maps(plain, stage_modules, images, model.staged.num_prefix_tokens)

    with torch.no_grad():
        no_matcher = model.staged.forward(images)
        # replacing each boundary by an equal copy goes through the write-back path
        rewritten = model.staged.forward(images, on_boundary=lambda i, f: f.clone())
        feats, state = model.forward_features(images)
    for k, w in enumerate(want):
        assert no_matcher[k].shape == w.shape
        assert no_matcher[k].shape[1] == model.staged.stages[k].channels
        torch.testing.assert_close(no_matcher[k], w, rtol=0, atol=0)
        torch.testing.assert_close(rewritten[k], w, rtol=0, atol=0)
        torch.testing.assert_close(feats[k], w, rtol=0, atol=0)  # zero-initialised injection
    assert set(state["interim"]) == set(model.method.boundary_indices)


def test_replacement_feeds_next_stage(family):
    _, name, kwargs, side = family
    model = pm.create_segmentor(make_backbone(name, kwargs), "spm", NUM_CLASSES)
    images, _ = make_batch(side)
    with torch.no_grad():
        base = model.staged.forward(images)
        changed = model.staged.forward(images, on_boundary=lambda i, f: f * 0.5 if i == 0 else f)
    torch.testing.assert_close(changed[0], base[0] * 0.5)
    assert not torch.allclose(changed[-1], base[-1]), "changing stage 0's output must change later stages"


def test_training_freezes_backbone_and_lowers_loss(family):
    _, name, kwargs, side = family
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(name, kwargs), "spm", NUM_CLASSES, "linear")
    backbone_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert model.train() is model
    assert not model.backbone.training and all(not m.training for m in model.backbone.modules())
    assert model.method.training and model.decode_head.training
    assert all(not p.requires_grad for p in model.backbone.parameters())

    images, labels = make_batch(side, n=4, num_classes=NUM_CLASSES)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    history = []
    for step in range(40):
        losses = model.loss(images, labels)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None for p in model.backbone.parameters())
            named = dict(model.named_parameters())
            no_grad = [n for n, p in named.items() if p.requires_grad and p.grad is None]
            assert not no_grad, f"trainable parameters without gradient: {no_grad}"
            # the zero-initialised output projections are what the first step moves
            assert all(float(p.weight.grad.abs().sum()) > 0 for p in model.method.out_proj.values())
        opt.step()
        history.append(float(losses["loss_decode"].detach()))
    assert history[-1] < 0.6 * history[0], history
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone_state[k], rtol=0, atol=0, msg=f"backbone tensor {k} changed")
    # the matchers are no longer the identity after training
    assert all(float(p.weight.abs().max()) > 0 for p in model.method.out_proj.values())


def test_prompt_checkpoint_round_trip(family, tmp_path):
    _, name, kwargs, side = family
    model = pm.create_segmentor(make_backbone(name, kwargs, seed=1), "spm", NUM_CLASSES, "multilevel")
    images, labels = make_batch(side, num_classes=NUM_CLASSES)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(model.loss(images, labels).values()).backward()
        opt.step()
    model.eval()
    path = pm.save_prompts(model, tmp_path / "ds.safetensors")
    other = pm.create_segmentor(make_backbone(name, kwargs, seed=1), "spm", NUM_CLASSES, "multilevel").eval()
    with torch.no_grad():
        assert not torch.equal(other(images), model(images))
        pm.load_prompts(other, path)
        torch.testing.assert_close(other(images), model(images), rtol=0, atol=0)
    # the file holds no frozen backbone weights
    meta = pm.read_prompt_metadata(path)
    assert not any(k.startswith("backbone.") for k in meta["tensors"])
