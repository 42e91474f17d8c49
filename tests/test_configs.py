"""Every ready config under configs/: it parses, its model builds (full size, offline) and
runs, its dataset and class count agree, its schedule is the benchmarking recipe, and a
missing dataset or weights file gives a clear error. Also checks the weight-conversion
recipes of configs/spm/README.md, and trains two ready configs, shrunk, with mmseg's own
train script."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

import torch  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.py") if "_base_" not in p.relative_to(CONFIG_DIR).parts)
CONFIG_IDS = [str(p.relative_to(CONFIG_DIR)) for p in CONFIGS]

# dataset type -> (number of classes, name in the missing-dataset error)
EXPECTED = {
    "ADE20KDataset": (150, "ADE20K"),
    "CityscapesDataset": (19, "Cityscapes"),
    "PascalVOCDataset": (21, "Pascal VOC 2012"),
    "PascalContextDataset59": (59, "Pascal Context"),
    "COCOStuffDataset": (171, "COCO-Stuff 164k"),
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def _leaf_datasets(cfg: Config):
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        stack = [cfg[key]["dataset"]]
        while stack:
            d = stack.pop()
            if "datasets" in d:
                stack.extend(d["datasets"])
            elif "dataset" in d:
                stack.append(d["dataset"])
            else:
                yield key, d


def _heads(model_cfg) -> list:
    aux = model_cfg.get("auxiliary_head")
    aux = [] if aux is None else (list(aux) if isinstance(aux, (list, tuple)) else [aux])
    return [model_cfg["decode_head"], *aux]


def _offline(model_cfg) -> ConfigDict:
    """The model config with its pretrained weights left out (built full size, randomly initialised)."""
    m = copy.deepcopy(model_cfg)
    if str(m.backbone.type).endswith("TimmBackbone"):
        m.backbone.weights = None
    else:
        m.backbone.init_cfg = None
    return m


def test_configs_found():
    assert len(CONFIGS) >= 20, CONFIG_IDS
    readme = (CONFIG_DIR / "spm" / "README.md").read_text()
    for p in CONFIGS:
        if p.parent.name == "spm":
            assert p.name in readme, f"{p.name} is not described in configs/spm/README.md"


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config(path: Path, tmp_path, monkeypatch):
    from mmseg.registry import DATASETS, MODELS
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData

    from promptmatch.backbones import WeightsNotFoundError
    from promptmatch.mmseg.runtime import DatasetMissingError, check_data_roots

    cfg = Config.fromfile(str(path))
    mcfg = cfg.model
    assert mcfg.type == "promptmatch.PromptEncoderDecoder"
    assert mcfg.method == "spm"

    # dataset and class count agree, in every dataloader and every head
    types = {d["type"] for _, d in _leaf_datasets(cfg)}
    assert len(types) == 1, types
    dtype = types.pop()
    assert dtype in EXPECTED, dtype
    num_classes, dataset_name = EXPECTED[dtype]
    assert len(DATASETS.get(dtype).METAINFO["classes"]) == num_classes
    for head in _heads(mcfg):
        assert head["num_classes"] == num_classes, head["type"]

    # training crop = the data preprocessor's pad size; slide windows within it
    crop = tuple(mcfg.data_preprocessor["size"])
    crops = [tuple(t["crop_size"]) for _, d in _leaf_datasets(cfg) for t in d["pipeline"] if t["type"] == "RandomCrop"]
    assert crops and set(crops) == {crop}
    if mcfg.test_cfg.get("mode") == "slide":
        assert tuple(mcfg.test_cfg.crop_size) == crop
        assert all(0 < s <= c for s, c in zip(mcfg.test_cfg.stride, crop))
    if str(mcfg.backbone.type).endswith("TimmBackbone"):
        assert mcfg.test_cfg.get("mode") == "slide"
        assert all(c % 16 == 0 for c in crop)
        assert mcfg.data_preprocessor["test_cfg"]["size_divisor"] % 16 == 0

    # the benchmarking schedule
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ("AdamW", 1e-4, 0.05)
    (poly,) = cfg.param_scheduler
    assert poly.type == "PolyLR" and poly.power == 0.9 and poly.end == cfg.train_cfg.max_iters
    assert cfg.train_cfg.type == "IterBasedTrainLoop"
    assert cfg.train_cfg.max_iters == (20000 if dtype == "PascalVOCDataset" else 40000)
    assert cfg.default_hooks.checkpoint.interval == 4000
    assert any(str(h["type"]).endswith("PromptCheckpointHook") for h in cfg.custom_hooks)

    # nothing is where the relative paths point inside an empty directory: clear errors
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetMissingError, match=dataset_name):
        check_data_roots(cfg)
    if str(mcfg.backbone.type).endswith("TimmBackbone"):
        assert mcfg.backbone.weights.startswith("pretrain/")
        with pytest.raises(WeightsNotFoundError, match=mcfg.backbone.weights):
            MODELS.build(copy.deepcopy(mcfg.backbone))
    else:
        assert mcfg.backbone.init_cfg.type == "Pretrained"
        assert mcfg.backbone.init_cfg.checkpoint.startswith("pretrain/")

    # the full-size model builds; backbone frozen, matchers and heads trainable
    torch.manual_seed(0)
    model = MODELS.build(_offline(mcfg))
    assert model.num_classes == num_classes
    assert not any(p.requires_grad for p in model.backbone.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {"method", "decode_head"} <= trainable
    if mcfg.get("auxiliary_head"):
        assert "auxiliary_head" in trainable
    assert len(model.staged.stages) == 4

    # it runs: losses of every head (channels line up) and the test path through the data
    # preprocessor (padding, slide/whole inference, resizing back) on a small odd-sized image
    model.eval()
    side = 64
    sample = SegDataSample(metainfo=dict(img_shape=(side, side), pad_shape=(side, side), ori_shape=(side, side)))
    sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, side, side)))
    with torch.no_grad():
        losses = model.loss(torch.randn(1, 3, side, side), [sample])
        assert "decode.loss_ce" in losses and any(k.startswith("prompt.loss_interim") for k in losses)
        if mcfg.get("auxiliary_head"):
            assert "aux.loss_ce" in losses
        assert all(torch.isfinite(v).all() for k, v in losses.items() if "loss" in k)
        h, w = 70, 90
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        meta = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        (out,) = model.test_step(dict(inputs=[image], data_samples=[meta]))
    pred = out.pred_sem_seg.data
    assert pred.shape == (1, h, w)
    assert 0 <= int(pred.min()) and int(pred.max()) < num_classes

    # the ResNet weights file named by the config is only read by init_weights: clear error
    if not str(mcfg.backbone.type).endswith("TimmBackbone"):
        model.backbone.init_cfg = copy.deepcopy(mcfg.backbone.init_cfg)
        with pytest.raises(FileNotFoundError, match="pretrain/resnet"):
            model.backbone.init_weights()


def _timm_vit_file(path: Path, with_head: bool) -> Path:
    """A ViT-B/16 weights file as the README makes it: a timm state dict in safetensors,
    without the classifier, or with it (a copy of the Hugging Face hub file)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000 if with_head else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vit.state_dict(), str(path))
    return path


@pytest.mark.parametrize("with_head", [False, True], ids=["headless", "hub_file"])
def test_readme_vit_weights_recipe(with_head, tmp_path, monkeypatch):
    from mmseg.registry import MODELS
    from safetensors.torch import load_file

    cfg = Config.fromfile(str(CONFIG_DIR / "spm" / "spm_vit-b16-linear_4xb4-40k_ade20k-512x512.py"))
    monkeypatch.chdir(tmp_path)
    _timm_vit_file(tmp_path / cfg.model.backbone.weights, with_head)
    model = MODELS.build(cfg.model)
    model.init_weights()
    ref = load_file(str(tmp_path / cfg.model.backbone.weights))
    got = model.backbone.model.state_dict()
    assert torch.equal(got["blocks.11.mlp.fc2.weight"], ref["blocks.11.mlp.fc2.weight"])
    assert torch.equal(got["patch_embed.proj.weight"], ref["patch_embed.proj.weight"])


@pytest.mark.parametrize("depth", [50, 101])
def test_readme_resnet_weights_recipe(depth, tmp_path, monkeypatch):
    """timm's resnet{50,101}c state dict, with the stem renamed as the README says, loads
    into the configs' ResNetV1c through init_cfg with every key matched."""
    import timm
    from mmseg.registry import MODELS

    torch.manual_seed(2)
    sd = timm.create_model(f"resnet{depth}c", pretrained=False, num_classes=0).state_dict()
    # the README's rename: conv1.<i> -> stem.<i>, bn1 -> stem.7 (the rest is identical)
    out = {}
    for k, v in sd.items():
        if k.startswith("conv1."):
            k = "stem." + k[len("conv1."):]
        elif k.startswith("bn1."):
            k = "stem.7." + k[len("bn1."):]
        out[k] = v
    cfg = Config.fromfile(str(CONFIG_DIR / "spm" / f"spm_r{depth}-upernet_4xb4-40k_ade20k-512x512.py"))
    monkeypatch.chdir(tmp_path)
    target = tmp_path / cfg.model.backbone.init_cfg.checkpoint
    target.parent.mkdir(parents=True)
    torch.save(out, target)
    backbone = MODELS.build(copy.deepcopy(cfg.model.backbone))
    missing = backbone.load_state_dict(out, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    backbone = MODELS.build(copy.deepcopy(cfg.model.backbone))
    backbone.init_weights()
    assert torch.equal(backbone.state_dict()["layer4.2.conv3.weight"], out["layer4.2.conv3.weight"])
    assert torch.equal(backbone.state_dict()["stem.7.running_var"], out["stem.7.running_var"])


@pytest.mark.parametrize("name", ["spm_vit-b16-linear_4xb4-40k_ade20k-512x512.py", "spm_vit-b16-upernet_4xb4-40k_ade20k-512x512.py"])
def test_ready_config_trains_with_mmseg_train_script(name, tmp_path):
    """A ready config, shrunk (tiny timm ViT, toy dataset, 2 iterations), trains and
    validates (sliding window) with mmseg's own train script; the prompt checkpoint hook of
    configs/_base_/default_runtime.py writes the prompts."""
    import re

    import mmseg

    import promptmatch as pm
    from mmseg_utils import dataset_block, make_tiny_dataset, python, run

    import timm
    from safetensors.torch import save_file

    data_root = make_tiny_dataset(tmp_path / "data")
    weights = tmp_path / "test_vit.safetensors"
    torch.manual_seed(3)
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), str(weights))
    upernet = "upernet" in name
    heads = (
        "neck=dict(in_channels=[64] * 4, out_channels=32),"
        "decode_head=dict(in_channels=[32] * 4, channels=16, num_classes=3),"
        "auxiliary_head=dict(in_channels=32, channels=8, num_classes=3),"
        if upernet else "decode_head=dict(in_channels=64, channels=64, num_classes=3),"
    )
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        f"_base_ = ['{CONFIG_DIR / 'spm' / name}']\n"
        "crop_size = (64, 64)\n"
        "model = dict(data_preprocessor=dict(size=crop_size),\n"
        f"             backbone=dict(model_name='test_vit', weights='{weights}'),\n"
        f"             {heads}\n"
        "             test_cfg=dict(mode='slide', crop_size=(48, 48), stride=(32, 32)))\n"
        + dataset_block(data_root)
    )
    script = str(Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py")
    res = run([python(), script, str(cfg), "--work-dir", str(tmp_path / "work")], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "promptmatch: spm on TimmBackbone" in out
    assert re.search(r"mIoU: [0-9.]+", out), out[-3000:]
    meta = pm.read_prompt_metadata(tmp_path / "work" / "prompts.safetensors")
    assert meta["num_classes"] == 3 and meta["class_names"] == ["red", "green", "blue"]
    assert not any(k.startswith("backbone.") for k in meta["tensors"])
    assert (tmp_path / "work" / "prompts" / "iter_2.safetensors").is_file()
    if upernet:
        return
    # tools/infer.py on the ViT model: an image whose sides are no multiple of the patch size
    # (padded for the sliding window, the padding cut off again)
    import numpy as np
    from PIL import Image

    src = np.asarray(Image.open(data_root / "img_dir" / "val" / "0.png").convert("RGB").resize((75, 50)))
    (tmp_path / "odd").mkdir()
    Image.fromarray(src).save(tmp_path / "odd" / "odd.png")
    res = run([python(), "tools/infer.py", str(cfg), str(tmp_path / "work" / "prompts.safetensors"),
               "--images", str(tmp_path / "odd"), "--out-dir", str(tmp_path / "seg")])
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    mask = np.asarray(Image.open(tmp_path / "seg" / "odd_mask.png"))
    assert mask.shape == (50, 75, 3)
