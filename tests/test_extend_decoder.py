"""Adding a decoder from outside the package, through the public registry only: the checklist of
docs/api.md ("Adding a decoder"), proven on a CNN and a ViT, training, prompt checkpoints and one
benchmark cell."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import pytest
import torch
from torch import nn

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch.training import train_segmentor

from conftest import make_backbone, make_batch

NUM_CLASSES = 4


@dataclass
class ToyDecoderConfig(pm.DecoderConfig):
    """Config of the toy decoder: its fields are the decoder's keyword arguments."""

    hidden: int = field(default=8, metadata={"help": "channels of the 3x3 convolution"})


class ToyDecoder(nn.Module):
    """A 3x3 convolution on the last two stages' features (the coarser one upsampled), then a classifier."""

    config_class = ToyDecoderConfig

    def __init__(self, stages: Sequence[pm.Stage], num_classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(stages[-1].channels + stages[-2].channels, hidden, 3, padding=1)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        fine, coarse = features[-2], features[-1]
        coarse = nn.functional.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.relu(self.conv(torch.cat([fine, coarse], 1))))

    def stages_read(self, num_stages: int) -> Tuple[int, ...]:
        return (num_stages - 2, num_stages - 1)


@pytest.fixture
def toy():
    """The toy decoder registered as ``"toy"`` for one test, then removed from the registry again."""
    pm.register_decoder("toy")(ToyDecoder)
    yield ToyDecoder
    # no public unregistering (as for methods): the test restores the registry it changed
    from promptmatch.decoders import DECODERS

    DECODERS.pop("toy", None)
    ToyDecoderConfig.decoder_name = ""


BACKBONES = [("test_resnet", 64), ("test_vit", 64)]


def test_registry_lists_and_builds_the_toy(toy):
    assert "toy" in pm.list_decoders() and pm.get_decoder("toy") is ToyDecoder
    stages = [pm.Stage(module="a", channels=6, reduction=8, index=0), pm.Stage(module="b", channels=10, reduction=16, index=1)]
    head = pm.build_decoder(ToyDecoderConfig(hidden=5), stages, 3)
    assert isinstance(head, ToyDecoder) and head.conv.out_channels == 5
    assert pm.build_decoder("toy", stages, 3, {"hidden": 7}).conv.out_channels == 7
    with pytest.raises(ValueError, match=r"bad decoder_cfg for 'toy': ToyDecoderConfig got unknown fields \['width'\]"):
        pm.build_decoder("toy", stages, 3, {"width": 7})
    with pytest.raises(ValueError, match="a decoder named 'toy' is already registered"):
        pm.register_decoder("toy")(type("OtherToy", (ToyDecoder,), {}))


@pytest.mark.parametrize("backbone,side", BACKBONES)
def test_toy_decoder_trains_and_round_trips_prompts(toy, tmp_path, backbone, side):
    images, labels = make_batch(side, n=4, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    model = pm.create_segmentor(make_backbone(backbone, {}), "spm", NUM_CLASSES, "toy",
                                decoder_cfg=ToyDecoderConfig(hidden=6))
    assert isinstance(model.decode_head, ToyDecoder) and model.decode_head.conv.out_channels == 6
    assert model.describe()["decoder"] == "toy" and model.describe()["decoder_config"] == {"hidden": 6}
    before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    result = train_segmentor(model, images, labels, steps=3, batch=2, lr=1e-2)
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert any(not torch.equal(before[k], v) for k, v in model.decode_head.state_dict().items()), "head did not train"
    model.eval()
    with torch.no_grad():
        want = model(images)
    assert want.shape == (4, NUM_CLASSES, side, side)

    path = pm.save_prompts(model, tmp_path / "toy.safetensors")
    assert pm.read_prompt_metadata(path)["decoder"] == "toy"
    torch.manual_seed(1)
    fresh = pm.create_segmentor(make_backbone(backbone, {}), "spm", NUM_CLASSES, "toy",
                                decoder_cfg={"hidden": 6}).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(images), want)
    pm.load_prompts(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(images), want)
    # a checkpoint of the toy decoder is refused by a model with another decoder config
    other = pm.create_segmentor(make_backbone(backbone, {}), "spm", NUM_CLASSES, "toy", decoder_cfg={"hidden": 5})
    with pytest.raises(pm.PromptMismatchError, match="decoder_config"):
        pm.load_prompts(other, path)


def test_benchmark_cell_with_the_toy_decoder(toy):
    spec = bm.validate_spec({
        "name": "toy-decoder",
        "methods": ["linear"],
        "backbones": [{"name": "test_resnet"}],
        "datasets": [{"name": "nuclei", "splits": ["val"]}],
        "settings": {"steps": 2, "batch": 2, "image_size": 64, "warmup": 1, "eval_batch": 64, "latency_images": 1,
                     "decoder": "toy", "decoder_cfg": {"hidden": 4}},
        "seeds": [0],
    })
    (cell,) = bm.expand_grid(spec)
    rec = bm.run_cell(cell)
    assert rec["status"] == "ok", rec
    head = rec["parameters"]["components"]["decode_head"]["trainable"]
    assert head > 0
