"""tools/infer.py end to end: train tiny prompts with tools/train.py, then write a class-index
PNG, a mask and an overlay per image (single file and folder), with the dataset's palette;
unreadable images skipped and listed (exit status 1) or, with --strict, the run refused; clear
errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

from mmseg_utils import make_tiny_dataset, python, run, write_backbone_weights, write_configs  # noqa: E402

PALETTE = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220]], dtype=np.uint8)  # the tiny dataset's


def _infer_module():
    """The tool's library module (tools/infer.py is a thin wrapper around it)."""
    import promptmatch.mmseg.cli.infer as infer

    return infer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    data_root = make_tiny_dataset(tmp / "data")
    cfg = write_configs(tmp, "upernet_r50", tmp / "backbone.pth", data_root)
    write_backbone_weights(cfg, tmp / "backbone.pth")
    work = tmp / "work"
    res = run([python(), "tools/train.py", str(cfg), "--work-dir", str(work)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    prompts = work / "prompts.safetensors"
    assert prompts.is_file()
    return tmp, cfg, prompts, data_root


def _colours(img: np.ndarray) -> set:
    return {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}


def test_infer_folder_and_file(trained):
    from PIL import Image

    tmp, cfg, prompts, data_root = trained
    val = data_root / "img_dir" / "val"
    # a folder: the tiny val images plus one of another size and format
    folder = tmp / "images"
    shutil.copytree(val, folder)
    odd = np.asarray(Image.open(val / "0.png").convert("RGB").resize((90, 50)))
    Image.fromarray(odd).save(folder / "odd.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    out = tmp / "out"
    opacity = 0.4
    res = run([python(), "tools/infer.py", str(cfg), str(prompts), "--images", str(folder),
               "--out-dir", str(out), "--opacity", str(opacity)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "segmented 5 image(s)" in res.stdout

    inputs = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(inputs) == 5
    masks = sorted(out.glob("*_mask.png"))
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(masks) == len(overlays) == len(inputs)
    palette = {tuple(int(v) for v in c) for c in PALETTE}
    for src in inputs:
        image = np.asarray(Image.open(src).convert("RGB"))
        mask = np.asarray(Image.open(out / f"{src.stem}_mask.png"))
        overlay = np.asarray(Image.open(out / f"{src.stem}_overlay.png"))
        assert mask.shape == overlay.shape == image.shape, src.name
        assert _colours(mask) <= palette, src.name
        expected = np.rint((1 - opacity) * image.astype(np.float32) + opacity * mask.astype(np.float32))
        assert np.abs(overlay.astype(np.int32) - expected.astype(np.int32)).max() <= 1
    legend = json.loads((out / "palette.json").read_text())
    assert legend == {"red": [220, 40, 40], "green": [40, 200, 60], "blue": [40, 60, 220]}

    # a single file; predictions are deterministic
    single = tmp / "single"
    res = run([python(), "tools/infer.py", str(cfg), str(prompts), "--images", str(val / "1.png"), "--out-dir", str(single)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert sorted(p.name for p in single.glob("*.png")) == ["1_labels.png", "1_mask.png", "1_overlay.png"]
    assert np.array_equal(np.asarray(Image.open(single / "1_mask.png")), np.asarray(Image.open(out / "1_mask.png")))
    # the class-index PNG holds the indices of the mask's colours
    labels = np.asarray(Image.open(single / "1_labels.png"))
    assert Image.open(single / "1_labels.png").mode == "P" and labels.max() < len(PALETTE)
    assert np.array_equal(PALETTE[labels], np.asarray(Image.open(single / "1_mask.png")))


def test_infer_skips_unreadable_images_and_strict_refuses(trained, tmp_path):
    from PIL import Image

    tmp, cfg, prompts, data_root = trained
    folder = tmp_path / "images"
    shutil.copytree(data_root / "img_dir" / "val", folder)
    good = sorted(p.stem for p in folder.glob("*.png"))
    buf = (folder / "z_broken.jpg")
    Image.open(folder / "0.png").convert("RGB").resize((64, 64)).save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])  # truncated: OpenCV fills it with grey
    (folder / "y_text.png").write_text("not an image")

    refused = tmp_path / "refused"
    res = run([python(), "tools/infer.py", str(cfg), str(prompts), "--images", str(folder), "--out-dir",
               str(refused), "--strict"])
    assert res.returncode == 1
    assert "--strict: 2 of" in res.stderr and "z_broken.jpg" in res.stderr and "y_text.png" in res.stderr
    assert not refused.exists()

    out = tmp_path / "out"
    res = run([python(), "tools/infer.py", str(cfg), str(prompts), "--images", str(folder), "--out-dir", str(out),
               "--outputs", "labels", "overlay"])
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-5000:]
    assert f"segmented {len(good)} image(s)" in res.stdout
    assert "2 of" in res.stderr and "could not be read and were skipped" in res.stderr
    assert "z_broken.jpg: image file is truncated" in res.stderr and "y_text.png: not an image file" in res.stderr
    want = sorted(f"{s}_{k}.png" for s in good for k in ("labels", "overlay"))
    assert sorted(p.name for p in out.glob("*.png")) == want


def test_infer_default_images_are_the_test_split(trained, tmp_path):
    tmp, cfg, prompts, data_root = trained
    res = run([python(), "tools/infer.py", str(cfg), str(prompts), "--out-dir", str(tmp_path)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    n = len(list((data_root / "img_dir" / "val").glob("*.png")))
    assert len(list(tmp_path.glob("*_mask.png"))) == len(list(tmp_path.glob("*_overlay.png"))) == n


def test_infer_clear_errors(trained, tmp_path, capsys):
    tmp, cfg, prompts, data_root = trained
    infer = _infer_module()
    with pytest.raises(SystemExit, match="does not exist"):
        infer.main([str(cfg), str(tmp_path / "missing.safetensors"), "--images", str(data_root)])
    with pytest.raises(SystemExit, match="no model state_dict .*mmengine Runner checkpoint"):
        infer.main([str(cfg), str(tmp / "backbone.pth"), "--images", str(data_root / "img_dir" / "val"),
                    "--out-dir", str(tmp_path)])  # a plain state dict, not a Runner checkpoint
    with pytest.raises(SystemExit, match="neither a prompt checkpoint"):
        infer.main([str(cfg), str(tmp / "backbone.ckpt"), "--images", str(data_root)])
    with pytest.raises(SystemExit, match="images .*do not exist"):
        infer.main([str(cfg), str(prompts), "--images", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        infer.main([str(cfg), str(prompts), "--images", str(tmp_path / "empty"), "--out-dir", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, status 2
        infer.main([str(cfg), str(prompts), "--opacity", "1.5"])
    assert exit_info.value.code == 2 and "opacity must be in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="pretrained weights are missing: .*nowhere.pth"):
        infer.main([str(cfg), str(prompts), "--images", str(data_root / "img_dir" / "val"), "--out-dir", str(tmp_path),
                    "--cfg-options", f"model.backbone.init_cfg.checkpoint={tmp_path / 'nowhere.pth'}"])
    # prompts trained for another method config are refused with the differing field
    other = tmp / "other_hidden.py"
    other.write_text(f"_base_ = ['./{cfg.name}']\nmodel = dict(method_cfg=dict(hidden_dim=32))\n")
    res = run([python(), "tools/infer.py", str(other), str(prompts), "--images", str(data_root / "img_dir" / "val"),
               "--out-dir", str(tmp_path / "refused")])
    assert res.returncode != 0
    assert "method_config.hidden_dim" in res.stderr
    assert not list((tmp_path / "refused").glob("*_mask.png"))


def test_palettes():
    infer = _infer_module()
    fixed = infer.fixed_palette(171)
    assert fixed.shape == (171, 3) and fixed.dtype == np.uint8
    assert len(_colours(fixed)) == 171  # distinct
    assert np.array_equal(infer.make_palette(3, {"palette": PALETTE.tolist()}), PALETTE)
    assert np.array_equal(infer.make_palette(3, {"palette": PALETTE[:2].tolist()}), infer.fixed_palette(3))
    assert np.array_equal(infer.make_palette(5, {}), infer.fixed_palette(5))
