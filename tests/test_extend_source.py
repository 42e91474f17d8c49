"""Adding a dataset source through the public registry only (the checklist of
docs/datasets.md, "Adding a dataset source"): a toy source of random textures made in
memory, validated in a spec and run through one benchmark cell to a record."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import pytest

from promptmatch import benchmark as bm


@dataclass
class ToyEntry(bm.DatasetEntry):
    """``count`` random-texture images per split, ``side`` pixels square, drawn from ``seed``."""

    count: Any = 6
    side: Any = 32
    seed: Any = 0

    def __post_init__(self, where: str) -> None:
        if not isinstance(self.count, int) or self.count < 2:
            raise bm.SpecError(f"{where}: 'count' must be an integer >= 2, got {self.count!r}")
        super().__post_init__(where)


class ToySource(bm.DataSource):
    name = "toy_textures"
    entry_class = ToyEntry
    default_engine = "memory"
    digest_keys = ("count", "side", "seed", "splits")

    def classes(self, entry: Mapping[str, Any]) -> List[str]:
        return ["smooth", "rough"]

    def arrays(self, entry: Mapping[str, Any], split: str, size: Optional[int]) -> Tuple[Any, Any]:
        rng = np.random.default_rng([entry["seed"], 0 if split == "train" else 1])
        n, s = entry["count"], entry["side"]
        labels = np.zeros((n, s, s), np.uint8)
        labels[:, :, s // 2:] = 1  # right half rough
        images = np.full((n, s, s, 3), 128, np.uint8)
        rough = rng.integers(0, 256, (n, s, s - s // 2, 3), dtype=np.uint8)
        images[:, :, s // 2:] = rough
        return images, labels


@pytest.fixture
def toy_source():
    bm.register_source(ToySource)
    yield ToySource.name
    bm.unregister_source(ToySource.name)


def _spec(**entry: Any) -> dict:
    return {"name": "toy", "methods": ["linear"], "backbones": [{"name": "test_resnet"}],
            "datasets": [{"name": "toy", "source": "toy_textures", **entry}],
            "settings": {"steps": 2, "batch": 2, "image_size": 32, "warmup": 0, "eval_batch": 8,
                         "latency_images": 1},
            "seeds": [0]}


def test_toy_source_validates_and_runs_a_cell(toy_source, tmp_path):
    assert toy_source in bm.list_sources()
    spec = bm.validate_spec(_spec(count=4))
    assert spec.datasets == [{"name": "toy", "source": "toy_textures", "count": 4, "side": 32, "seed": 0,
                              "splits": ["val"], "eval_on": [], "eval_only": False}]
    (cell,) = bm.expand_grid(spec)
    assert cell.settings["engine"] == "memory"  # the source's default engine
    assert '"dataset":"toy@' in cell.key  # the digest of the source's digest_keys
    assert bm.expand_grid(bm.validate_spec(_spec(count=5)))[0].key != cell.key

    written = bm.run_benchmark(spec, tmp_path, progress=False, report=False, isolate=False)
    assert len(written) == 1
    (rec,) = written
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["key"] == cell.key and rec["dataset"] == "toy"
    assert set(rec["per_class_iou"]["val"]) == {"smooth", "rough"}
    assert 0 <= rec["miou"]["val"] <= 1
    assert bm.run_benchmark(spec, tmp_path, progress=False, report=False, isolate=False) == []  # resumed


def test_toy_source_entry_checks_itself(toy_source):
    with pytest.raises(bm.SpecError, match=r"datasets\[0\] \(toy\): 'count' must be an integer >= 2"):
        bm.validate_spec(_spec(count=1))
    with pytest.raises(bm.SpecError, match=r"unknown key\(s\) \['folder'\] for a toy_textures dataset"):
        bm.validate_spec(_spec(folder="x"))
    with pytest.raises(bm.SpecError, match="the memory engine cannot load|has no mmseg dataset config"):
        bm.data.mmseg_dataset_config(bm.validate_spec(_spec()).datasets[0], "val", False, (32, 32))


def test_unknown_source_names_the_registered_ones():
    with pytest.raises(bm.SpecError, match="unknown source 'nope'.*offline, folder, mmseg_config"):
        bm.validate_spec(_spec(count=3) | {"datasets": [{"name": "x", "source": "nope"}]})
    with pytest.raises(ValueError, match="already registered"):
        class Clash(bm.DataSource):
            name = "offline"
        bm.register_source(Clash)
