"""The shared matrix every registered tuning method goes through (checks in method_contract.py):
it applies where it declares it does and refuses the other backbones by name, starts as the
frozen backbone where it says so, what is frozen stays frozen, the loss falls on a fixed
batch, prompt checkpoints round-trip exactly."""
from __future__ import annotations

import pytest

import promptmatch as pm

from method_contract import CONTRACT_BACKBONES, KNOWN_NEEDS, applies, build, check_method_contract


@pytest.mark.parametrize("backbone", CONTRACT_BACKBONES, ids=[b.id for b in CONTRACT_BACKBONES])
@pytest.mark.parametrize("method", pm.list_methods())
def test_method_matrix(method, backbone, tmp_path):
    check_method_contract(method, backbone, tmp_path)


def test_declared_needs_are_known_and_every_method_applies_somewhere():
    for method in pm.list_methods():
        assert set(pm.get_method(method).needs) <= KNOWN_NEEDS, method
        assert any(applies(method, b) for b in CONTRACT_BACKBONES), method
    # the matrix tests refusals too: at least one built-in method does not apply to a CNN
    assert any(not applies(m, CONTRACT_BACKBONES[1]) for m in pm.list_methods())


def test_param_groups_split_backbone_lr():
    model = build("spm", CONTRACT_BACKBONES[1])
    groups = model.param_groups(lr=1e-3, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["prompts_and_head"]
    assert sum(p.numel() for g in groups for p in g["params"]) == pm.parameter_report(model).trainable
