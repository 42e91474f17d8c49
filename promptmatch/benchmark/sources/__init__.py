"""Dataset sources of benchmark specs: one registered :class:`DataSource` per kind of entry.

A spec's dataset entry names its kind with ``"source"`` (default: ``folder`` when it has a
``folder``, ``mmseg_config`` when it has one, else ``offline``). Each source brings a typed
entry (a :class:`DatasetEntry` dataclass that checks itself), the classes, the data checks
run before any training, the in-memory arrays and/or an mmseg dataset config, and the
entry's part of a cell key. Adding one: a module with a :class:`DataSource` subclass
decorated with :func:`register_source` (see ``docs/datasets.md``, "Adding a dataset source").
"""
from __future__ import annotations

from .base import DIGEST_KEYS, DatasetEntry, DataSource, get_source, list_sources, register_source, unregister_source
from .offline import OfflineEntry, OfflineSource  # noqa: I001  (registration order: offline first)
from .folder import FolderEntry, FolderSource, folder_of
from .mmseg_config import MmsegConfigEntry, MmsegConfigSource, config_ref, load_config_ref

__all__ = ["DataSource", "DatasetEntry", "register_source", "unregister_source", "get_source", "list_sources", "DIGEST_KEYS",
           "OfflineEntry", "OfflineSource", "FolderEntry", "FolderSource", "folder_of",
           "MmsegConfigEntry", "MmsegConfigSource", "config_ref", "load_config_ref"]
