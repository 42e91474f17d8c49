"""One normalisation rule for raw images: the backbone's pretrained statistics, recorded in
prompt checkpoints and merged files, used by the folder engine, the in-memory benchmark and
predict; files written before it was recorded keep ImageNet's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import promptmatch as pm

from conftest import make_backbone

IMAGENET = (pm.IMAGENET_MEAN, pm.IMAGENET_STD)
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_backbone_statistics_by_name_and_module():
    assert pm.input_normalisation("vit_base_patch16_224") == HALF
    assert pm.input_normalisation("resnet50") == IMAGENET
    clip_mean, _ = pm.input_normalisation("vit_base_patch16_clip_224")
    assert clip_mean[0] == pytest.approx(0.4815, abs=1e-4)
    assert pm.input_normalisation("no_such_model") == IMAGENET
    assert pm.input_normalisation(make_backbone("test_vit", {})) == HALF  # timm's test models: 0.5 / 0.5

    class Wrapper(nn.Module):  # mmseg's TimmBackbone keeps the timm model as .model
        def __init__(self):
            super().__init__()
            self.model = make_backbone("test_vit", {})

    assert pm.input_normalisation(Wrapper()) == HALF
    assert pm.input_normalisation(nn.Conv2d(3, 3, 1)) == IMAGENET  # nothing recorded


def test_checkpoints_record_it_and_loading_applies_it(tmp_path):
    model = pm.create_segmentor(make_backbone("test_vit", {}), "spm", 3)
    assert model.input_normalisation == HALF
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    assert pm.read_prompt_metadata(path)["input_normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    other = pm.create_segmentor(make_backbone("test_vit", {}), "spm", 3)
    other.input_normalisation = IMAGENET
    pm.load_prompts(other, path)
    assert other.input_normalisation == HALF
    merged = pm.save_segmentor(model, tmp_path / "m.safetensors")
    assert pm.load_segmentor(merged).input_normalisation == HALF
    bank = pm.PromptBank(make_backbone("test_vit", {}))
    assert bank.add("a", path).input_normalisation == HALF


def test_files_written_before_the_record_get_imagenet():
    """tests/data/spm_v3 was written before 2026-12-06's record (test_resnet, whose timm
    statistics are 0.5 / 0.5): it was trained on ImageNet-normalised inputs, and predicts so."""
    data = Path(__file__).parent / "data" / "spm_v3"
    assert "input_normalisation" not in pm.read_prompt_metadata(data / "prompts.safetensors")
    model = pm.create_segmentor(make_backbone("test_resnet", {}, live_branches=False), "spm", 3, "multilevel", method_cfg=pm.SPMConfig.v3())
    assert model.input_normalisation == HALF
    pm.load_prompts(model, data / "prompts.safetensors")
    assert model.input_normalisation == IMAGENET


def test_predict_normalises_with_the_models_statistics():
    model = pm.create_segmentor(make_backbone("test_vit", {}), "linear", 3).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    with torch.no_grad():
        for mean, std in (HALF, IMAGENET):
            model.input_normalisation = (mean, std)
            want = model(((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)))
            _, logits = pm.predict(model, image, return_logits=True)
            torch.testing.assert_close(logits, want[0], rtol=1e-5, atol=1e-5)
        explicit = pm.predict(model, image, mean=HALF[0], std=HALF[1], return_logits=True)[1]
        model.input_normalisation = HALF
        torch.testing.assert_close(explicit, pm.predict(model, image, return_logits=True)[1])


def test_folder_dataset_and_memory_tensors_use_the_given_statistics(tmp_path):
    from promptmatch.benchmark.data import memory_tensors
    from promptmatch.datasets import describe_folder_dataset, export_offline_as_folder
    from promptmatch.engine.data import FolderSegDataset

    root = export_offline_as_folder("texture_mosaic", tmp_path / "tm")
    ds = describe_folder_dataset(root)
    plain = FolderSegDataset(ds, "val")[0]["inputs"]
    half = FolderSegDataset(ds, "val", normalisation=HALF)[0]["inputs"]
    m, s = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    raw = plain * s + m  # back to 0..1
    torch.testing.assert_close(half, (raw - 0.5) / 0.5, rtol=1e-5, atol=1e-5)
    x_img, _ = memory_tensors({"name": "texture_mosaic"}, "val", None)
    x_half, _ = memory_tensors({"name": "texture_mosaic"}, "val", None, HALF)
    torch.testing.assert_close(x_half, (x_img * torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
                                        + torch.tensor(IMAGENET[0]).view(1, 3, 1, 1) - 0.5) / 0.5,
                               rtol=1e-5, atol=1e-5)


def test_onnx_file_records_the_statistics(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from promptmatch.export import export_onnx

    model = pm.create_segmentor(make_backbone("test_resnet", {}), "linear", 3).eval()
    out = tmp_path / "m.onnx"
    export_onnx(model, out, image_size=(32, 32))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["input_mean"] == "[0.5, 0.5, 0.5]" and props["input_std"] == "[0.5, 0.5, 0.5]"
