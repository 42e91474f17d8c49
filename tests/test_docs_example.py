"""The Python training example of docs/api.md ("Training in Python") runs as written: SPM on a
folder in mmseg's layout, evaluation, a prompt checkpoint, masks for a folder of images. Only
its first line (the settings it tells the reader to change) is replaced: a small generated
folder, the tiny ``test_resnet`` backbone, no pretrained weights, a few steps."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MARKER = "<!-- example: train-spm-on-a-folder -->"
SETTINGS = "DATA, BACKBONE, PRETRAINED, SIZE, STEPS = "


def _example() -> str:
    text = DOC.read_text(encoding="utf-8")
    assert MARKER in text, f"{DOC.name} lost its example marker"
    m = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert m, "the marker must be followed by a ```python block"
    return m.group(1)


def _folder(root: Path, classes) -> dict:
    """Images whose class is visible (colour per class), masks to match; val images of mixed sizes."""
    rng = np.random.default_rng(0)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
    sizes = {"train": [(48, 40)] * 6, "val": [(40, 52), (33, 47), (64, 64)]}
    for split, shapes in sizes.items():
        for sub in ("img_dir", "ann_dir"):
            (root / sub / split).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            mask = rng.integers(0, len(classes), (h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
            mask[:2, :2] = 255  # ignored pixels
            img = colours[np.where(mask == 255, 0, mask)] + rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "img_dir" / split / f"{i}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8)).save(root / "ann_dir" / split / f"{i}.png")
    (root / "classes.json").write_text(json.dumps(classes))
    return sizes


def test_the_training_example_of_the_docs_runs(tmp_path, monkeypatch):
    code = _example()
    first, rest = code.split("\n", 1)
    assert first.startswith(SETTINGS), f"the example's first line must set {SETTINGS.strip(' =')}, got {first!r}"
    classes = ["red", "green", "blue"]
    sizes = _folder(tmp_path / "data", classes)
    monkeypatch.chdir(tmp_path)  # the example writes prompts.safetensors into the working directory
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(f'{SETTINGS}"data", "test_resnet", False, 32, 2\n' + rest, str(DOC), "exec"), scope)

    assert list(scope["ds"].classes) == classes
    assert isinstance(scope["miou"], float) and 0.0 <= scope["miou"] <= 1.0
    assert len(scope["per_class"]) == 3
    predictions = scope["predictions"]
    assert predictions.dtype == torch.long and predictions.shape == (3, 32, 32)
    masks = scope["masks"]
    assert [tuple(m.shape) for m in masks] == sizes["val"]  # each at its image's own size
    import promptmatch as pm

    meta = pm.read_prompt_metadata(tmp_path / "prompts.safetensors")
    assert meta["class_names"] == classes and meta["method"] == "spm"
