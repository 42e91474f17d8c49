"""Predicting a folder never loses work (promptmatch.predict_cli, tools/infer.py --segmentor):
an unreadable image is named, skipped with a warning and listed at the end with exit status 1;
``--strict`` refuses the run before predicting anything, naming every bad file; what was written
stays when a run stops. Per image: a class-index PNG that a folder dataset takes back for
training, the colour mask and the overlay (``--outputs`` picks)."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptmatch as pm
from promptmatch import predict_cli
from promptmatch.visualize import OUTPUTS

REPO = Path(__file__).resolve().parents[1]
NAMES = ["sky", "road", "car"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    torch.manual_seed(0)
    seg = pm.create_segmentor("test_resnet", "spm", 3, class_names=NAMES).eval()
    path = pm.save_segmentor(seg, tmp_path_factory.mktemp("seg") / "seg.safetensors")
    return seg, path


def _jpeg(rng, h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """a.png, b.jpg, d.png readable; c.jpg truncated, e.jpg not an image; ._a.jpg hidden (ignored)."""
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 33, 3), dtype=np.uint8)).save(imgs / "a.png")
    (imgs / "b.jpg").write_bytes(_jpeg(rng, 37, 52))
    data = _jpeg(rng, 64, 64)
    (imgs / "c.jpg").write_bytes(data[: len(data) // 2])  # truncated: the header reads, the pixels do not
    Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(imgs / "d.png")
    (imgs / "e.jpg").write_text("not an image")
    (imgs / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: not an input
    return imgs


def test_unreadable_images_are_named_skipped_and_listed(merged, folder, tmp_path, capsys, caplog):
    seg, path = merged
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        status = predict_cli.main([str(path), "--images", str(folder), "--out-dir", str(out)])
    assert status == 1
    err = capsys.readouterr().err
    assert "2 of 5 image(s) could not be read and were skipped" in err
    assert f"{folder / 'c.jpg'}: image file is truncated" in err
    assert f"{folder / 'e.jpg'}: not an image file" in err
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "c.jpg" in warned and "e.jpg" in warned
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["palette.json"] + [OUTPUTS[k].format(stem=s) for s in "abd" for k in OUTPUTS])
    for stem, src in (("a", "a.png"), ("b", "b.jpg"), ("d", "d.png")):
        ref = pm.predict(seg, str(folder / src)).numpy()
        with Image.open(out / f"{stem}_labels.png") as im:
            assert im.mode == "P"  # class indices, shown in the class colours
            assert np.array_equal(np.asarray(im), ref)
        colours = np.array(list(json.loads((out / "palette.json").read_text()).values()), dtype=np.uint8)
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}_mask.png")), colours[ref])
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == ref.shape + (3,)


def test_strict_refuses_before_predicting_and_names_every_bad_file(merged, folder, tmp_path):
    _, path = merged
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        predict_cli.main([str(path), "--images", str(folder), "--out-dir", str(out), "--strict"])
    msg = str(info.value.code)
    assert "--strict: 2 of 5 image(s) cannot be read; nothing was predicted" in msg
    assert "c.jpg: image file is truncated" in msg and "e.jpg: not an image file" in msg
    assert "a.png" not in msg
    assert not out.exists()
    # a clean folder passes --strict
    for bad in ("c.jpg", "e.jpg"):
        (folder / bad).unlink()
    assert predict_cli.main([str(path), "--images", str(folder), "--out-dir", str(out), "--strict"]) == 0
    assert len(list(out.glob("*_labels.png"))) == 3


def test_outputs_picks_the_files(merged, folder, tmp_path):
    _, path = merged
    (folder / "c.jpg").unlink()
    (folder / "e.jpg").unlink()
    out = tmp_path / "out"
    assert predict_cli.main([str(path), "--images", str(folder / "b.jpg"), "--out-dir", str(out),
                             "--outputs", "labels"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["b_labels.png", "palette.json"]
    with pytest.raises(SystemExit):
        predict_cli.parse_args([str(path), "--images", str(folder), "--outputs", "colours"])


def test_labels_go_back_into_a_training_folder(merged, folder, tmp_path):
    """The class-index PNGs are masks a folder dataset takes as they are (single channel, values
    = class indices, same size as the image)."""
    from promptmatch.datasets import describe_folder_dataset, load_folder_split

    _, path = merged
    out = tmp_path / "out"
    predict_cli.main([str(path), "--images", str(folder), "--out-dir", str(out), "--outputs", "labels"])
    root = tmp_path / "data"
    for sub in ("img_dir", "ann_dir"):
        (root / sub / "train").mkdir(parents=True)
    Image.open(folder / "a.png").save(root / "img_dir" / "train" / "a.png")
    (out / "a_labels.png").rename(root / "ann_dir" / "train" / "a.png")
    ds = describe_folder_dataset(root, classes=NAMES, splits=("train",))
    images, labels = load_folder_split(ds, "train")
    assert np.array_equal(labels[0], pm.predict(merged[0], str(folder / "a.png")).numpy())


def test_outputs_written_before_a_crash_stay(merged, folder, tmp_path, monkeypatch):
    """Each image's files are written as soon as it is predicted, each atomically: a run that
    dies at the second image keeps the first one's complete files and leaves no temporaries."""
    seg, path = merged
    (folder / "c.jpg").unlink()
    (folder / "e.jpg").unlink()
    real, calls = pm.predict, []

    def dies_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pm, "predict", dies_at_the_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict_cli.main([str(path), "--images", str(folder), "--out-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.png", "a_mask.png", "a_overlay.png", "palette.json"]
    assert np.array_equal(np.asarray(Image.open(out / "a_labels.png")), real(seg, str(folder / "a.png")).numpy())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a file the user cannot read (not root)")
def test_a_file_without_read_permission_is_named(merged, folder, tmp_path, capsys):
    _, path = merged
    (folder / "e.jpg").unlink()
    (folder / "c.jpg").unlink()
    locked = folder / "b.jpg"
    locked.chmod(0)
    try:
        assert predict_cli.main([str(path), "--images", str(folder), "--out-dir", str(tmp_path / "out")]) == 1
    finally:
        locked.chmod(0o644)
    assert f"{locked}: permission denied" in capsys.readouterr().err


def test_tools_infer_exit_status_and_listing(merged, folder, tmp_path):
    _, path = merged
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "infer.py"), "--segmentor", str(path), "--images",
                           str(folder), "--out-dir", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "segmented 3 image(s)" in proc.stdout
    assert "c.jpg: image file is truncated" in proc.stderr and "e.jpg: not an image file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(list(out.glob("*_labels.png"))) == 3
