"""pm.predict: padding to what the backbone takes, whole/slide modes, every input kind, batching,
flip test-time augmentation, mixed precision and errors, against hand-computed references."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import promptmatch as pm
from promptmatch.inference import segment_logits
from promptmatch.predict import SizeRule, predict, size_rule

from conftest import make_backbone

K = 3
CROP, STRIDE = 32, 20


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return pm.create_segmentor(make_backbone("test_resnet", {}, seed=0), "spm", K, "linear").eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(1)
    return pm.create_segmentor(make_backbone("test_vit", {}, seed=1), "spm", K, "linear").eval()


@pytest.fixture(scope="module")
def fixed_vit():
    import timm

    torch.manual_seed(2)
    backbone = timm.create_model("test_vit", num_classes=0, img_size=32, dynamic_img_size=False)
    return pm.create_segmentor(backbone, "spm", K, "linear").eval()


@pytest.fixture(params=["resnet", "vit"])
def model(request):
    return request.getfixturevalue(request.param)


def _u8(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _norm(u8: np.ndarray) -> torch.Tensor:
    """The (3, H, W) normalised tensor of a uint8 (H, W, 3) array, by hand, with the statistics
    of timm's test models (0.5 / 0.5: the models' ``input_normalisation``, predict's default)."""
    mean = torch.tensor(HALF[0]).view(3, 1, 1)
    std = torch.tensor(HALF[1]).view(3, 1, 1)
    return (torch.from_numpy(u8).permute(2, 0, 1).float() / 255 - mean) / std


def _reference(model, x, padded, mode):
    """Logits (K, H, W) of x (3, H, W): padded by hand at bottom/right with zeros, run, cropped."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (0, padded[1] - w, 0, padded[0] - h))[None]
    with torch.no_grad():
        if mode == "whole":
            out = model(xp)
        else:
            out = segment_logits(model, xp, mode="slide", crop=CROP, stride=STRIDE)
    return out[0, :, :h, :w]


# ----------------------------------------------------------------------------- sizes
def test_size_rule(resnet, vit, fixed_vit):
    assert size_rule(resnet) == SizeRule(patch=(1, 1), multiple=(1, 1), minimum=(32, 32), fixed=None)
    assert size_rule(resnet).padded(45, 37) == (45, 37)
    assert size_rule(resnet).padded(20, 50) == (32, 50)
    assert size_rule(resnet, size_divisor=32).padded(45, 37) == (64, 64)
    assert size_rule(vit) == SizeRule(patch=(16, 16), multiple=(16, 16), minimum=(16, 16), fixed=None)
    assert size_rule(vit).padded(45, 37) == (48, 48)
    assert size_rule(vit, size_divisor=24).padded(45, 37) == (48, 48)  # lcm(16, 24) = 48
    assert size_rule(fixed_vit).fixed == (32, 32)
    assert size_rule(fixed_vit).padded(20, 30) == (32, 32)
    assert size_rule(fixed_vit).padded(45, 37, crop=(32, 32)) == (45, 37)
    assert size_rule(nn.Conv2d(3, K, 1)).padded(5, 7) == (5, 7)  # no staged backbone: any size


# ------------------------------------------------------------------ hand-computed refs
@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("hw", [(45, 37), (50, 61), (20, 50)])
def test_odd_sizes_equal_hand_padded_reference(model, mode, hw):
    u8 = _u8(*hw, seed=hw[0])
    x = _norm(u8)
    kw = dict(crop=CROP, stride=STRIDE) if mode == "slide" else {}
    classes, logits = predict(model, x, mode=mode, return_logits=True, **kw)
    padded = size_rule(model).padded(*hw)
    ref = _reference(model, x, padded, mode)
    assert logits.shape == (K, *hw) and logits.dtype == torch.float32
    assert classes.shape == hw and classes.dtype == torch.long
    assert torch.allclose(logits, ref, atol=1e-5)
    assert torch.equal(classes, logits.argmax(0))


def test_size_divisor_pads_further(resnet):
    x = _norm(_u8(45, 37))
    _, logits = predict(resnet, x, return_logits=True, size_divisor=32)
    assert torch.allclose(logits, _reference(resnet, x, (64, 64), "whole"), atol=1e-5)


def test_fixed_size_vit(fixed_vit):
    x = _norm(_u8(20, 30))
    _, logits = predict(fixed_vit, x, return_logits=True)
    assert torch.allclose(logits, _reference(fixed_vit, x, (32, 32), "whole"), atol=1e-5)
    big = _norm(_u8(45, 37))
    with pytest.raises(ValueError, match="32x32 inputs only.*mode='slide'"):
        predict(fixed_vit, big)
    _, logits = predict(fixed_vit, big, mode="slide", crop=32, stride=20, return_logits=True)
    assert torch.allclose(logits, _reference(fixed_vit, big, (45, 37), "slide"), atol=1e-5)
    with pytest.raises(ValueError, match="use crop=\\(32, 32\\)"):
        predict(fixed_vit, big, mode="slide", crop=48, stride=20)


# --------------------------------------------------------------------- input kinds
def test_every_input_kind_gives_the_same_result(vit, tmp_path):
    a, b = _u8(45, 37, seed=1), _u8(50, 61, seed=2)
    ref_a, ref_la = predict(vit, _norm(a), return_logits=True)
    ref_b = predict(vit, _norm(b))
    Image.fromarray(a).save(tmp_path / "0_a.png")
    Image.fromarray(b).save(tmp_path / "1_b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    singles = [a, Image.fromarray(a), tmp_path / "0_a.png", str(tmp_path / "0_a.png"),
               torch.from_numpy(a).permute(2, 0, 1).contiguous()]  # uint8 CHW tensor: raw
    for single in singles:
        classes, logits = predict(vit, single, return_logits=True)
        assert torch.equal(classes, ref_a), type(single)
        assert torch.allclose(logits, ref_la, atol=1e-5), type(single)
    gray = predict(vit, a[:, :, 0])  # grayscale (H, W) is replicated to RGB
    assert torch.equal(gray, predict(vit, np.repeat(a[:, :, :1], 3, axis=2)))
    for many in [tmp_path, str(tmp_path), [a, b], [tmp_path / "0_a.png", Image.fromarray(b)], [_norm(a), b]]:
        out = predict(vit, many)
        assert isinstance(out, list) and len(out) == 2
        assert torch.equal(out[0], ref_a) and torch.equal(out[1], ref_b)
    # a folder in a list expands in place
    out = predict(vit, [b, tmp_path])
    assert [tuple(o.shape) for o in out] == [(50, 61), (45, 37), (50, 61)]


def test_batched_inputs_return_tensors(resnet):
    u8 = np.stack([_u8(45, 37, seed=s) for s in range(3)])
    x = torch.stack([_norm(u) for u in u8])
    classes, logits = predict(resnet, x, return_logits=True, batch=3)
    assert classes.shape == (3, 45, 37) and logits.shape == (3, K, 45, 37)
    for i in range(3):
        assert torch.allclose(logits[i], predict(resnet, x[i], return_logits=True)[1], atol=1e-5)
    assert torch.equal(predict(resnet, u8, batch=2), classes)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_mixed_sizes_and_batch_equal_one_by_one(vit, mode):
    # sizes 45x37 and 44x40 pad to the same 48x48 and share a batch; 50x61 goes alone
    imgs = [_u8(45, 37, 1), _u8(50, 61, 2), _u8(44, 40, 3), _u8(45, 37, 4)]
    kw = dict(crop=CROP, stride=STRIDE) if mode == "slide" else {}
    one_c, one_l = predict(vit, imgs, mode=mode, return_logits=True, batch=1, **kw)
    many_c, many_l = predict(vit, imgs, mode=mode, return_logits=True, batch=3, **kw)
    assert [tuple(c.shape) for c in many_c] == [(45, 37), (50, 61), (44, 40), (45, 37)]
    for i, img in enumerate(imgs):
        assert torch.allclose(many_l[i], one_l[i], atol=1e-4)
        assert torch.allclose(one_l[i], predict(vit, img, mode=mode, return_logits=True, **kw)[1], atol=1e-6)
        assert (many_c[i] == one_c[i]).float().mean() > 0.99


def test_flip_is_average_with_flipped_prediction(model):
    x = _norm(_u8(45, 37, 5))
    _, logits = predict(model, x, flip=True, return_logits=True)
    _, plain = predict(model, x, return_logits=True)
    _, flipped = predict(model, x.flip(-1), return_logits=True)
    assert torch.allclose(logits, (plain + flipped.flip(-1)) / 2, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-4)


def test_eval_mode_during_prediction_and_restored(resnet):
    seen = []
    hook = resnet.decode_head.register_forward_hook(lambda m, i, o: seen.append(m.training))
    resnet.train()
    try:
        predict(resnet, _norm(_u8(40, 40)))
        assert seen == [False]
        assert resnet.training and resnet.decode_head.training
        assert not resnet.backbone.training  # the frozen backbone stays in eval mode
    finally:
        hook.remove()
        resnet.eval()


def test_progress_bar_for_folders(vit, tmp_path, capsys):
    for i in range(2):
        Image.fromarray(_u8(32, 32, i)).save(tmp_path / f"{i}.png")
    predict(vit, tmp_path)
    assert "predict" in capsys.readouterr().err
    predict(vit, tmp_path, progress=False)
    assert "predict" not in capsys.readouterr().err


def test_bf16_agrees_with_fp32(model):
    x = _norm(_u8(45, 37, 6))
    c32 = predict(model, x)
    c16, l16 = predict(model, x, amp="bf16", return_logits=True)
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    assert (c16 == c32).float().mean() > 0.8


# --------------------------------------------------------------------------- errors
class HalfSize(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], K, x.shape[2] // 2, x.shape[3] // 2)


def test_errors(vit, tmp_path):
    x = _norm(_u8(45, 37))
    with pytest.raises(TypeError, match="unsupported image input int"):
        predict(vit, 3)
    with pytest.raises(TypeError, match="lists of images cannot nest"):
        predict(vit, [[x]])
    with pytest.raises(TypeError, match="uint8"):
        predict(vit, np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="float.*or uint8"):
        predict(vit, torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty list"):
        predict(vit, [])
    with pytest.raises(ValueError, match="has no image files"):
        predict(vit, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such image"):
        predict(vit, tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ValueError, match="not an image file"):
        predict(vit, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="mode must be"):
        predict(vit, x, mode="tiles")
    with pytest.raises(ValueError, match="needs both crop and stride"):
        predict(vit, x, mode="slide", crop=32)
    with pytest.raises(ValueError, match="only to mode='slide'"):
        predict(vit, x, crop=32, stride=16)
    with pytest.raises(ValueError, match="larger than crop"):
        predict(vit, x, mode="slide", crop=32, stride=48)
    with pytest.raises(ValueError, match="not a multiple of the backbone's patch size"):
        predict(vit, x, mode="slide", crop=40, stride=20)
    with pytest.raises(ValueError, match="amp must be"):
        predict(vit, x, amp="fp8")
    with pytest.raises(ValueError, match="batch must be"):
        predict(vit, x, batch=0)
    with pytest.raises(ValueError, match="input resolution"):
        predict(HalfSize(), x)


def test_predict_cli_writes_masks_of_a_merged_segmentor(tmp_path):
    """tools/infer.py --segmentor (promptmatch.predict_cli): masks equal pm.predict's, one per image."""
    import subprocess
    import sys

    from promptmatch import predict_cli

    torch.manual_seed(0)
    seg = pm.create_segmentor("test_resnet", "spm", 3, class_names=["a", "b", "c"]).eval()
    merged = pm.save_segmentor(seg, tmp_path / "seg.safetensors")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(45, 37), (64, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    out = tmp_path / "out"
    assert predict_cli.main([str(merged), "--images", str(imgs), "--out-dir", str(out), "--mode", "slide",
                             "--crop", "32", "32", "--stride", "24", "24"]) == 0
    palette = json.loads((out / "palette.json").read_text())
    assert list(palette) == ["a", "b", "c"]
    colours = np.array(list(palette.values()), dtype=np.uint8)
    for i in range(2):
        mask = np.asarray(Image.open(out / f"im{i}_mask.png"))
        ref = pm.predict(seg, str(imgs / f"im{i}.png"), mode="slide", crop=32, stride=24).numpy()
        assert mask.shape[:2] == ref.shape and np.array_equal(mask, colours[ref])
        assert (out / f"im{i}_overlay.png").is_file()
    repo = Path(__file__).resolve().parents[1]  # tools/infer.py dispatches --segmentor to it
    proc = subprocess.run([sys.executable, str(repo / "tools" / "infer.py"), "--segmentor", str(merged), "--images",
                           str(imgs / "im0.png"), "--out-dir", str(tmp_path / "out2")], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out2" / "im0_mask.png").is_file()
    with pytest.raises(SystemExit, match="does not exist"):
        predict_cli.main([str(tmp_path / "nope.safetensors"), "--images", str(imgs)])


def test_prompt_bank_predicts_a_folder_per_dataset(tmp_path):
    """PromptBank.predict serves a folder with one dataset's prompts on the shared backbone,
    as the dataset's own model would."""
    torch.manual_seed(0)
    models = {name: pm.create_segmentor("test_resnet", "spm", k).eval() for name, k in (("a", 3), ("b", 5))}
    backbone = models["a"].backbone
    models["b"].backbone.load_state_dict(backbone.state_dict())  # one frozen backbone for both
    bank = pm.PromptBank(backbone)
    for name, seg in models.items():
        bank.add(name, pm.save_prompts(seg, tmp_path / f"{name}.safetensors"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 33), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    for name, seg in models.items():
        got = bank.predict(imgs, name, return_logits=True)
        ref = pm.predict(seg, imgs, return_logits=True)
        assert len(got[0]) == len(ref[0]) == len(got[1]) == len(ref[1]) == 2  # one per image of the folder
        assert [tuple(g.shape) for g in got[0]] == [(40, 33), (64, 64)]
        assert all(torch.equal(g, r) for g, r in zip(got[0], ref[0]))
        assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(got[1], ref[1]))
