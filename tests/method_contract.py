"""The contract every tuning method meets, as checks any test can run on any registered method.

``tests/test_methods.py`` runs every method of the registry through :func:`check_method_contract`
on :data:`CONTRACT_BACKBONES`; ``tests/test_extend_method.py`` runs a toy method registered from
outside the package through the same function. Which method applies to which backbone comes
from the method's declared ``needs`` and what each test backbone has, never from a table of
method names.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, List, Tuple

import pytest
import torch

import promptmatch as pm

from conftest import make_backbone, make_batch

NUM_CLASSES = 4


@dataclass(frozen=True)
class ContractBackbone:
    """A tiny timm backbone of the matrix and what it has of :attr:`pm.TuningMethod.needs`."""

    id: str
    name: str
    kwargs: Tuple[Tuple[str, object], ...]
    side: int
    has: FrozenSet[str]

    def create(self, seed: int = 0) -> torch.nn.Module:
        return make_backbone(self.name, dict(self.kwargs), seed=seed)


CONTRACT_BACKBONES = (
    ContractBackbone("vit", "test_vit", (), 64, frozenset({"token_blocks", "attn_mlp_blocks"})),
    ContractBackbone("resnet", "test_resnet", (), 64, frozenset()),
)
#: every name a method may declare in ``needs`` (a new one needs a test backbone that has it)
KNOWN_NEEDS = frozenset().union(*(b.has for b in CONTRACT_BACKBONES))


def applies(method: str, backbone: ContractBackbone) -> bool:
    """Whether ``method`` declares that it applies to ``backbone``."""
    needs = set(pm.get_method(method).needs)
    assert needs <= KNOWN_NEEDS, f"{method} needs {sorted(needs - KNOWN_NEEDS)}: no test backbone has that"
    return needs <= backbone.has


def build(method: str, backbone: ContractBackbone, seed: int = 0, decoder: str = "linear") -> pm.PromptSegmentor:
    torch.manual_seed(seed)
    return pm.create_segmentor(backbone.create(seed), method, NUM_CLASSES, decoder)


def check_refused(method: str, backbone: ContractBackbone) -> None:
    """A method that does not apply refuses the backbone by name, and leaves it unstaged."""
    model = backbone.create()
    with pytest.raises(pm.MethodNotApplicableError) as info:
        pm.create_segmentor(model, method, NUM_CLASSES, "linear")
    assert method in str(info.value) and type(model).__name__ in str(info.value), str(info.value)
    assert getattr(model, "_promptmatch_staged", None) is None


def check_starts_as_backbone(method: str, backbone: ContractBackbone) -> None:
    """Freshly built, a method declared ``starts_as_backbone`` gives the decoder exactly the
    frozen backbone's features (compared with the ``linear`` probe of the same backbone); one
    declared otherwise changes them."""
    images, _ = make_batch(backbone.side, n=2, num_classes=NUM_CLASSES)
    model, ref = build(method, backbone).eval(), build("linear", backbone).eval()
    with torch.no_grad():
        got, _ = model.forward_features(images)
        want, _ = ref.forward_features(images)
    assert len(got) == len(want) > 0
    if pm.get_method(method).starts_as_backbone:
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"{method} changes the features of boundary {i} at initialisation"
    else:
        assert not all(torch.equal(g, w) for g, w in zip(got, want)), f"{method} is declared to change the features"


def check_gradients(model: pm.PromptSegmentor, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One backward pass: every trainable parameter the forward pass uses gets a gradient
    (backbone modules after the last stage, such as a ViT's final norm, never run), nothing
    frozen does, and a method that neither trains the backbone nor acts inside its stages
    unfreezes none of it."""
    method = type(model.method)
    ran = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.add(id(mod))) for m in model.backbone.modules()]
    try:
        sum(model.loss(images, labels).values()).backward()
    finally:
        for h in hooks:
            h.remove()
    unused = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()
              if id(model.backbone.get_submodule(n.rpartition(".")[0])) not in ran}
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable, "nothing trains"
    assert [n for n in trainable if params[n].grad is None and n not in unused] == [], \
        "trainable parameters without a gradient"
    assert [n for n, p in params.items() if not p.requires_grad and p.grad is not None] == []
    if method.freezes_backbone and not method.trains_inside_backbone:
        assert not any(p.requires_grad for p in model.backbone.parameters()), (
            f"{method.name} unfreezes backbone parameters but does not set trains_inside_backbone")


def check_training(model: pm.PromptSegmentor, images: torch.Tensor, labels: torch.Tensor,
                   steps: int = 30) -> List[float]:
    """The loss falls clearly on a fixed batch; frozen backbone parameters (and, where the
    backbone is frozen, its buffers: BatchNorm statistics) do not change. Returns the losses."""
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.backbone.named_buffers()}
    assert model.train() is model
    assert model.backbone.training == (not model.staged.frozen)
    opt = torch.optim.AdamW(model.param_groups(lr=3e-3))
    history = []
    for _ in range(steps):
        losses = model.loss(images, labels)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append(float(losses["loss_decode"].detach()))
    assert history[-1] < 0.7 * history[0], history
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen backbone parameter {n} changed"
    if model.staged.frozen:
        for n, b in model.backbone.named_buffers():
            assert torch.equal(b, buffers[n]), f"backbone buffer {n} changed"
    return history


def check_round_trip(model: pm.PromptSegmentor, method: str, backbone: ContractBackbone, tmp_path: Path,
                     images: torch.Tensor) -> None:
    """A prompt checkpoint holds every trainable tensor, and reloaded onto a freshly built
    model gives bit-identical outputs."""
    model.eval()
    path = pm.save_prompts(model, tmp_path / f"{method}.safetensors")
    fresh = build(method, backbone).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(images), model(images))  # so the load below has something to do
        pm.load_prompts(fresh, path)
        torch.testing.assert_close(fresh(images), model(images), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(pm.read_prompt_metadata(path)["tensors"]) >= trainable


def check_deep_copy(model: pm.PromptSegmentor, images: torch.Tensor) -> None:
    """``copy.deepcopy`` of a trained model computes what the model does and runs its own
    parameters (an EMA or teacher copy): changing the copy's method parameters changes the
    copy's output and leaves the original's as it was."""
    model.eval()
    with torch.no_grad():
        want = model(images)
        with warnings.catch_warnings():  # a method hooking with closures is told so on copy
            warnings.filterwarnings("error", message=".*is a closure")
            twin = copy.deepcopy(model).eval()
        torch.testing.assert_close(twin(images), want, rtol=0, atol=0)
        own = [p for n, p in twin.named_parameters() if p.requires_grad and not n.startswith("decode_head.")]
        if not own:
            return  # nothing but the head trains (linear probing)
        g = torch.Generator().manual_seed(7)
        for p in own:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
        assert not torch.allclose(twin(images), want), "the copy's method parameters do not act in the copy"
        torch.testing.assert_close(model(images), want, rtol=0, atol=0)


def check_method_contract(method: str, backbone: ContractBackbone, tmp_path: Path, steps: int = 30) -> None:
    """Every check above for one registered method on one backbone of the matrix."""
    if not applies(method, backbone):
        check_refused(method, backbone)
        return
    check_starts_as_backbone(method, backbone)
    images, labels = make_batch(backbone.side, n=4, num_classes=NUM_CLASSES)
    check_gradients(build(method, backbone), images, labels)
    model = build(method, backbone)
    check_training(model, images, labels, steps=steps)
    check_round_trip(model, method, backbone, tmp_path, images)
    check_deep_copy(model, images)
