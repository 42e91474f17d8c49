"""Adding an offline dataset through the public API only (the checklist of
docs/datasets.md, "Adding an offline dataset"): a toy three-texture mosaic registered with
``register_offline_dataset``, built, loaded, and run through one benchmark cell to a record."""
from __future__ import annotations

import dataclasses

import pytest

from promptmatch import benchmark as bm
from promptmatch import datasets as D

TOY = D.OfflineDatasetSpec(
    name="toy_three_textures",
    description="Blobby Voronoi regions of three grey-level textures; class = texture",
    kind="mosaic",
    classes=("brick", "grass", "gravel"),
    palette=((178, 34, 34), (34, 139, 34), (160, 160, 160)),
    sources=("brick", "grass", "gravel"),
    crop_px=(96, 160),
    colour_mode="gray",
    num_train=6,
    num_val=4,
    seed=4242,
    layout={"regions": (2, 3)},  # distinct classes per scene: at most as many regions as classes
)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMATCH_DATA", str(tmp_path / "data"))  # build under the test's folder
    D.register_offline_dataset(TOY)
    yield TOY.name
    D.unregister_offline_dataset(TOY.name)


def test_toy_offline_dataset_builds_and_runs_a_cell(toy, tmp_path):
    assert toy in D.list_offline_datasets() and D.OFFLINE_DATASETS[toy] is TOY
    assert D.dataset_classes(toy) == ["brick", "grass", "gravel"]
    root = D.build_offline_dataset(toy)
    assert root == tmp_path / "data" / toy and D.verify_offline_dataset(root)
    images, labels = D.load_offline_split(toy, "val_blur")
    assert images.shape == (4, D.IMAGE_SIZE, D.IMAGE_SIZE, 3) and labels.shape == (4, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert set(labels.ravel().tolist()) <= {0, 1, 2, D.IGNORE_INDEX}

    spec = bm.validate_spec({
        "name": "toy", "methods": ["linear"], "backbones": [{"name": "test_resnet"}],
        "datasets": [{"name": toy, "splits": ["val", "val_noise"]}],
        "settings": {"steps": 2, "batch": 2, "image_size": 32, "warmup": 0, "eval_batch": 8, "latency_images": 1},
        "seeds": [0]})
    (cell,) = bm.expand_grid(spec)
    assert cell.settings["engine"] == "memory" and f'"dataset":"{toy}"' in cell.key
    (rec,) = bm.run_benchmark(spec, tmp_path / "bench", progress=False, report=False, isolate=False)
    assert rec["status"] == "ok", rec.get("reason")
    assert set(rec["miou"]) == {"val", "val_noise"}
    assert set(rec["per_class_iou"]["val"]) == {"brick", "grass", "gravel"}


def test_register_refuses_what_cannot_be_built(toy):
    with pytest.raises(ValueError, match="already registered"):
        D.register_offline_dataset(dataclasses.replace(TOY, seed=1))
    with pytest.raises(ValueError, match="kind 'spiral' has no scene generator.*unknown source image"):
        D.register_offline_dataset(dataclasses.replace(TOY, name="bad", kind="spiral", sources=("nope", "grass")))
    with pytest.raises(ValueError, match="3 classes but 1 palette colours"):
        D.register_offline_dataset(dataclasses.replace(TOY, name="bad", palette=((0, 0, 0),)))
    with pytest.raises(ValueError, match="up to 5 regions of distinct classes but has 3 classes"):
        D.register_offline_dataset(dataclasses.replace(TOY, name="bad", layout={}))
    assert "bad" not in D.list_offline_datasets()
    with pytest.raises(ValueError, match="no offline dataset named 'bad'"):
        D.unregister_offline_dataset("bad")
