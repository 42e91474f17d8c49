"""The method extension point, proven from outside the package: a toy method written against
the public API only (``pm.MethodConfig``, ``pm.TuningMethod``, ``pm.register_method``), run
through the same contract checks as the built-in methods (method_contract.py) on a CNN and a
ViT, and through one benchmark cell. docs/methods.md's "Adding a method" lists exactly what
this file needed."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

import pytest
import torch
from torch import nn

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch.methods import unregister_method

from conftest import make_batch
from method_contract import (CONTRACT_BACKBONES, applies, build, check_deep_copy, check_gradients, check_method_contract,
                             check_refused, check_starts_as_backbone)


# ------------------------------------------------------------------- the toy method (user code)
@dataclass
class ToyAffineConfig(pm.MethodConfig):
    """Settings of the toy: how strongly the per-channel scale acts."""

    gain: float = field(default=1.0, metadata={"help": "multiplier of the learned per-channel scale"})

    def __post_init__(self) -> None:
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)) or not math.isfinite(self.gain):
            raise ValueError(f"ToyAffineConfig.gain must be a finite number, got {self.gain!r}")
        self.gain = float(self.gain)


class ToyAffine(pm.TuningMethod):
    """A learned per-channel affine change of every boundary's features, zero at initialisation:
    ``x + gain * scale * x + shift``."""

    name = "toy_affine"
    config_class = ToyAffineConfig

    def __init__(self, stages: Sequence[pm.Stage], num_classes: int, config: ToyAffineConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.scale = nn.ParameterList([nn.Parameter(torch.zeros(s.channels)) for s in self.stages])
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(s.channels)) for s in self.stages])

    def boundary(self, index: int, features: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        scale = self.config.gain * self.scale[index].view(1, -1, 1, 1)
        return features + scale * features + self.shift[index].view(1, -1, 1, 1)


class ToyTokenScale(ToyAffine):
    """The same, declared (and checked in ``attach``) for token models only."""

    name = "toy_token_scale"
    needs = ("token_blocks",)

    def attach(self, backbone: nn.Module) -> None:
        if not isinstance(getattr(backbone, "num_prefix_tokens", None), int):
            raise pm.MethodNotApplicableError(
                f"{self.name} needs a ViT-like backbone with token blocks; {type(backbone).__name__} has none")


class ToyShifted(ToyAffine):
    """A broken toy: declared to start as the backbone, but its shift starts at one."""

    name = "toy_shifted"

    def __init__(self, stages: Sequence[pm.Stage], num_classes: int, config: ToyAffineConfig) -> None:
        super().__init__(stages, num_classes, config)
        with torch.no_grad():
            for p in self.shift:
                p.fill_(1.0)


class ToyUnflagged(ToyAffine):
    """A broken toy: trains the backbone's first parameter without ``trains_inside_backbone``."""

    name = "toy_unflagged"

    def attach(self, backbone: nn.Module) -> None:
        next(backbone.parameters()).requires_grad_(True)


class ToyClosureHook(ToyAffine):
    """A toy hooking a backbone convolution with a closure over itself (the form
    ``TuningMethod.gated`` warns about on a deep copy)."""

    name = "toy_closure_hook"

    def __init__(self, stages: Sequence[pm.Stage], num_classes: int, config: ToyAffineConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.gain = nn.Parameter(torch.zeros(()))

    def attach(self, backbone: nn.Module) -> None:
        conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
        self.hook_backbone(conv, lambda module, args, out: out * (1 + self.gain))


@pytest.fixture
def toys():
    """The toys registered through the public registry for one test, then taken out again
    (so no other test's view of list_methods() holds them)."""
    classes = (ToyAffine, ToyTokenScale, ToyShifted, ToyUnflagged, ToyClosureHook)
    try:
        yield tuple(pm.register_method(cls) for cls in classes)
    finally:
        for cls in classes:
            if cls.name in pm.list_methods():
                unregister_method(cls.name)


# ------------------------------------------------------------------------------------- tests
def test_toy_is_registered_through_the_public_registry(toys):
    assert {"toy_affine", "toy_token_scale"} <= set(pm.list_methods())
    assert pm.get_method("toy_affine") is ToyAffine
    with pytest.raises(ValueError, match="already registered"):
        pm.register_method(type("Other", (ToyAffine,), {}))  # same name, another class
    with pytest.raises(ValueError, match="no tuning method named 'nothing'"):
        unregister_method("nothing")
    with pytest.raises(ValueError, match="gain must be a finite number"):
        pm.create_segmentor(CONTRACT_BACKBONES[1].create(), "toy_affine", 4, method_cfg={"gain": "big"})
    model = pm.create_segmentor(CONTRACT_BACKBONES[1].create(), "toy_affine", 4, method_cfg={"gain": 2.0})
    assert model.method.config == ToyAffineConfig(gain=2.0)


@pytest.mark.parametrize("backbone", CONTRACT_BACKBONES, ids=[b.id for b in CONTRACT_BACKBONES])
def test_toy_meets_the_method_contract(toys, backbone, tmp_path):
    assert applies("toy_affine", backbone)
    check_method_contract("toy_affine", backbone, tmp_path)


def test_toy_for_token_models_refuses_a_cnn(toys):
    cnn = CONTRACT_BACKBONES[1]
    assert not applies("toy_token_scale", cnn) and applies("toy_token_scale", CONTRACT_BACKBONES[0])
    check_refused("toy_token_scale", cnn)


def test_the_contract_catches_broken_methods(toys):
    """The shared checks can fail: a method that breaks a declaration is caught."""
    cnn = CONTRACT_BACKBONES[1]
    with pytest.raises(AssertionError, match="toy_shifted changes the features of boundary 0"):
        check_starts_as_backbone("toy_shifted", cnn)
    images, labels = make_batch(cnn.side, n=2)
    with pytest.raises(AssertionError, match="does not set trains_inside_backbone|without a gradient"):
        check_gradients(build("toy_unflagged", cnn), images, labels)


def test_a_closure_hook_is_named_when_the_model_is_copied(toys):
    """A method's hook given as a closure keeps the original's parameters in a deep copy: the
    copy warns, naming the hook, and the contract's deep-copy check fails on it."""
    cnn = CONTRACT_BACKBONES[1]
    images, _ = make_batch(cnn.side, n=2)
    model = build("toy_closure_hook", cnn)
    with pytest.warns(UserWarning, match=r"ToyClosureHook\.attach\.<locals>\.<lambda> is a closure"):
        copy.deepcopy(model)
    with pytest.raises(UserWarning, match="is a closure"):
        check_deep_copy(model, images)


def test_toy_runs_as_a_benchmark_cell(toys, tmp_path):
    spec = bm.validate_spec({
        "name": "toy-method",
        "methods": ["linear", "toy_affine", {"name": "toy_affine", "label": "toy_affine-gain2", "cfg": {"gain": 2.0}}],
        "backbones": [{"name": "test_resnet"}],
        "datasets": [{"name": "nuclei", "splits": ["val"]}],
        "settings": {"engine": "memory", "steps": 4, "batch": 2, "image_size": 64, "warmup": 1, "eval_batch": 64,
                     "latency_images": 1},
        "seeds": [0],
    })
    recs = bm.run_benchmark(spec, tmp_path, progress=False, isolate=False)
    by_method = {r["method"]: r for r in recs}
    assert sorted(by_method) == ["linear", "toy_affine", "toy_affine-gain2"]
    for label in ("toy_affine", "toy_affine-gain2"):
        rec = by_method[label]
        assert rec["status"] == "ok", rec.get("reason")
        assert set(rec["miou"]) == {"val"} and 0.0 <= rec["miou"]["val"] <= 1.0
        # the toy's own parameters count: two vectors per boundary on top of the linear probe's head
        assert rec["trainable_params"] > by_method["linear"]["trainable_params"]
    assert by_method["toy_affine-gain2"]["method_name"] == "toy_affine"
    assert "toy_affine" in (tmp_path / "report.md").read_text()


def test_toys_are_gone_after_their_tests():
    """Runs after the tests above (file order): the fixture took every toy out again."""
    assert not {"toy_affine", "toy_token_scale", "toy_shifted", "toy_unflagged"} & set(pm.list_methods())
