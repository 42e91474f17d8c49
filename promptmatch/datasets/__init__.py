"""Datasets for benchmarks and tests that need no download at run time.

:mod:`promptmatch.datasets.offline` builds small semantic-segmentation datasets in the
mmsegmentation layout from real image content shipped in PyPI packages (scikit-image sample
images, the stardist wheel's nuclei image). Importing this package needs only numpy and
Pillow, never imports mmseg/mmcv/mmengine or scikit-image, and prints nothing.

:mod:`promptmatch.datasets.folder` describes, checks and loads user-supplied image/mask
folders in the same layout, and writes such folders (the offline datasets exported or
rendered at another size). An offline dataset is added with :func:`register_offline_dataset`
(see docs/datasets.md, "Adding an offline dataset").
"""
from .folder import (
    FolderDataset,
    FolderDatasetError,
    check_folder_dataset,
    describe_folder_dataset,
    export_offline_as_folder,
    folder_pairs,
    load_folder_split,
    write_folder_dataset,
)
from .offline import (
    BUILD_VERSION,
    IGNORE_INDEX,
    IMAGE_SIZE,
    OFFLINE_DATASETS,
    SHIFTS,
    SPLITS,
    STARDIST_REQUIREMENT,
    OfflineDataError,
    OfflineDatasetSpec,
    SourceChecksumError,
    SourceNotFoundError,
    build_offline_dataset,
    register_offline_dataset,
    render_offline_as_folder,
    dataset_classes,
    dataset_palette,
    default_data_root,
    default_wheel_dir,
    fetch_stardist_wheel,
    find_stardist_wheel,
    list_offline_datasets,
    load_offline_split,
    mmseg_dataset_config,
    unregister_offline_dataset,
    verify_offline_dataset,
)

__all__ = [
    "BUILD_VERSION",
    "IGNORE_INDEX",
    "IMAGE_SIZE",
    "OFFLINE_DATASETS",
    "SHIFTS",
    "SPLITS",
    "STARDIST_REQUIREMENT",
    "OfflineDataError",
    "OfflineDatasetSpec",
    "SourceChecksumError",
    "SourceNotFoundError",
    "build_offline_dataset",
    "register_offline_dataset",
    "unregister_offline_dataset",
    "render_offline_as_folder",
    "dataset_classes",
    "dataset_palette",
    "default_data_root",
    "default_wheel_dir",
    "fetch_stardist_wheel",
    "find_stardist_wheel",
    "list_offline_datasets",
    "load_offline_split",
    "mmseg_dataset_config",
    "verify_offline_dataset",
    "FolderDataset",
    "FolderDatasetError",
    "check_folder_dataset",
    "describe_folder_dataset",
    "export_offline_as_folder",
    "folder_pairs",
    "load_folder_split",
    "write_folder_dataset",
]
