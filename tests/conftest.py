"""Shared fixtures: the family matrix of tiny, randomly initialised timm backbones."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# (id, timm name, create kwargs, test image side)
FAMILIES = [
    ("resnet", "test_resnet", {}, 64),
    ("convnext", "test_convnext", {}, 64),
    ("efficientnet", "test_efficientnet", {}, 64),
    ("regnet", "regnetx_002", {}, 64),
    ("mobilenetv3", "mobilenetv3_small_050", {}, 64),
    ("swin", "swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)), 64),
    ("vit", "test_vit", {}, 64),
    ("deit", "deit_tiny_patch16_224", dict(depth=4, embed_dim=64, num_heads=2), 64),
    ("eva02", "eva02_tiny_patch14_224", dict(depth=4, embed_dim=64, num_heads=2), 56),
    ("dinov2_reg", "vit_small_patch14_reg4_dinov2", dict(depth=4, embed_dim=64, num_heads=2), 56),
    ("pvtv2", "pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64),
]
FAMILY_IDS = [f[0] for f in FAMILIES]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower integration tests (CI runs them too)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped where torch.cuda.is_available() is False")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def cuda_unavailable_reason():
    """Why the ``cuda`` tests cannot run here, or ``None`` when a CUDA GPU is usable."""
    if not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = " (CUDA_VISIBLE_DEVICES is empty)" if hidden is not None and not hidden.strip() else ""
        return (f"CUDA is not available{why}: torch {torch.__version__} sees no GPU; the cuda tests run on a "
                "GPU machine (bash tools/gpu_check.sh, or pytest -m cuda there)")
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA GPU is usable."""
    reason = None
    for item in items:
        if item.get_closest_marker("cuda") is None:
            continue
        reason = reason or cuda_unavailable_reason()
        if reason is None:
            return
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def family(request):
    return request.param


def make_backbone(name, kwargs, seed=0, live_branches=True):
    """A randomly initialised timm backbone whose every branch acts, as in a pretrained one:
    timm zero-initialises the last norm of each residual branch (``zero_init_last``) and
    starts layer scales at 1e-6 (ConvNeXt), which would leave a method acting inside those
    branches (LoRA, DoRA, SSF on a ResNet's convs)
    without any effect on the output, and tests of it passing for the wrong reason.
    ``live_branches=False``: timm's own initialisation (what the checkpoints in tests/data,
    written before 2026-12-07, were made with)."""
    import promptmatch as pm

    torch.manual_seed(seed)
    model = pm.create_backbone(name, **kwargs)
    if not live_branches:
        return model
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm))
                    and isinstance(w, torch.Tensor) and w.numel() and not w.any()):
                w.fill_(1.0)
        for n, p in model.named_parameters():  # layer scales initialised near 0 (ConvNeXt: 1e-6)
            if n.split(".")[-1] == "gamma" and p.numel() and float(p.abs().max()) < 1e-4:
                p.fill_(1.0)
    return model


def make_batch(side, n=2, num_classes=4, seed=0):
    """Images with a learnable structure: the label of a pixel is its image quadrant's colour class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n, 2, 2), generator=g)
    labels = labels.repeat_interleave(side // 2, 1).repeat_interleave(side // 2, 2)
    palette = torch.rand(num_classes, 3, generator=g) * 2 - 1
    images = palette[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, 3, side, side, generator=g)
    return images.contiguous(), labels
