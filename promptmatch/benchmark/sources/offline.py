"""``offline``: a dataset promptmatch builds from packaged image content, by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import SpecError
from .base import DataSource, DatasetEntry, register_source, subset_config

__all__ = ["OfflineEntry", "OfflineSource"]


def _val_splits() -> List[str]:
    from promptmatch import datasets as pmdata

    return [s for s in pmdata.SPLITS if s.startswith("val")]


@dataclass
class OfflineEntry(DatasetEntry):
    """An offline dataset by name (see ``promptmatch.datasets.list_offline_datasets()``);
    ``splits`` defaults to every validation split (``val`` and the shifted ones)."""

    def __post_init__(self, where: str) -> None:
        from promptmatch import datasets as pmdata

        offline = pmdata.list_offline_datasets()
        if self.name not in offline:
            raise SpecError(f"{where}: unknown offline dataset {self.name!r}; available: {', '.join(offline)} "
                            "(or give a 'folder' or an 'mmseg_config')")
        super().__post_init__(where)

    def default_splits(self) -> List[str]:
        return _val_splits()

    def check_splits(self, splits: List[str], where: str) -> None:
        val_splits = _val_splits()
        bad = [s for s in splits if s not in val_splits]
        if bad or not splits:
            raise SpecError(f"{where}: unknown split(s) {bad}; available: {', '.join(val_splits)}")


@register_source
class OfflineSource(DataSource):
    """Offline datasets: built once before the cells, loaded whole by the in-memory engine."""

    name = "offline"
    entry_class = OfflineEntry
    default_engine = "memory"

    def key_part(self, entry: Mapping[str, Any]) -> str:
        return entry["name"]  # a name fixes the data

    def classes(self, entry: Mapping[str, Any]) -> List[str]:
        from promptmatch import datasets as pmdata

        return list(pmdata.dataset_classes(entry["name"]))

    def native_size(self, entry: Mapping[str, Any]) -> Optional[int]:
        from promptmatch import datasets as pmdata

        return int(pmdata.IMAGE_SIZE)

    def prepare(self, entry: Mapping[str, Any]) -> None:
        from promptmatch import datasets as pmdata

        pmdata.build_offline_dataset(entry["name"])

    def train_count(self, entry: Mapping[str, Any]) -> int:
        from promptmatch import datasets as pmdata

        return int(pmdata.OFFLINE_DATASETS[entry["name"]].num_train)

    def arrays(self, entry: Mapping[str, Any], split: str, size: Optional[int]) -> Tuple[Any, Any]:
        from promptmatch import datasets as pmdata

        return pmdata.load_offline_split(pmdata.build_offline_dataset(entry["name"]), split)

    def mmseg_dataset(self, entry: Mapping[str, Any], split: str, pipeline: List[Dict[str, Any]], train: bool,
                      crop: Tuple[int, int], indices: Optional[List[int]], explicit_size: bool
                      ) -> Tuple[Dict[str, Any], Optional[Tuple[int, int]]]:
        cfg = dict(type="promptmatch.OfflineSegDataset", name=entry["name"], split=split, pipeline=pipeline)
        return subset_config(cfg, indices), None
