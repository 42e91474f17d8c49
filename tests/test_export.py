"""ONNX export (promptmatch.export, tools/export.py): onnxruntime agrees with PyTorch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import promptmatch as pm  # noqa: E402
from promptmatch.export import ExportError, ExportReport, SegLogitsAtInputSize, export_onnx  # noqa: E402

from conftest import make_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDE = 64
K = 5
SWIN_KW = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
BACKBONES = {
    "resnet": ("test_resnet", {}),
    "convnext": ("test_convnext", {}),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_KW),
    "vit": ("test_vit", {}),
}


def build(backbone: str = "resnet", method: str = "spm", decoder: str = "linear", seed: int = 0) -> nn.Module:
    """A tiny segmentor whose trainable parts are moved off their (identity) initialisation, on
    a backbone whose every residual branch acts (conftest.make_backbone)."""
    name, kw = BACKBONES[backbone]
    model = pm.create_segmentor(make_backbone(name, kw or {}, seed=seed), method, K, decoder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(["logits"], {"images": images.numpy()})[0])


def assert_agrees(model: nn.Module, path: Path, images: torch.Tensor, atol: float = 1e-3) -> None:
    with torch.no_grad():
        ref = model(images)
    got = run_onnx(path, images)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= atol
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.999


MATRIX = [(b, m, d) for b in BACKBONES for m in ("spm", "lora") for d in ("linear", "multilevel")]
FAST = {("resnet", "spm", "linear"), ("vit", "lora", "multilevel"), ("swin", "spm", "multilevel"),
        ("convnext", "lora", "linear")}


@pytest.mark.parametrize(
    "backbone,method,decoder",
    [pytest.param(*case, marks=() if case in FAST else pytest.mark.slow, id="-".join(case)) for case in MATRIX],
)
def test_export_agrees_with_pytorch(tmp_path, backbone, method, decoder):
    model = build(backbone, method, decoder)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, (SIDE, SIDE))
    assert isinstance(report, ExportReport)
    assert report.path == path and path.is_file() and report.file_bytes == path.stat().st_size
    assert report.opset == 18 and not report.dynamic and report.dynamic_axes == {}
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-3
    assert report.argmax_agreement is not None and report.argmax_agreement >= 0.999
    assert report.checked_sizes == ((1, SIDE, SIDE),)
    assert not model.training
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    # an independent check on other images, batch 1 (the graph is static)
    assert_agrees(model, path, torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7)))


def test_dynamic_cnn_runs_at_other_sizes(tmp_path):
    model = build("resnet", "spm", "multilevel")
    path = tmp_path / "dyn.onnx"
    report = export_onnx(model, path, (SIDE, SIDE), dynamic=True)
    assert report.dynamic and report.dynamic_spatial
    assert report.dynamic_axes == {0: "batch", 2: "height", 3: "width"}
    assert len(report.checked_sizes) == 3 and report.notes == ()
    assert_agrees(model, path, torch.randn(3, 3, 96, 160, generator=torch.Generator().manual_seed(3)))


def test_dynamic_vit_keeps_spatial_axes_static_and_says_so(tmp_path, caplog):
    model = build("vit", "spm", "linear")
    path = tmp_path / "vit.onnx"
    with caplog.at_level("WARNING", logger="promptmatch.export"):
        report = export_onnx(model, path, (SIDE, SIDE), dynamic=True)
    assert report.dynamic and report.dynamic_axes == {0: "batch"} and not report.dynamic_spatial
    assert report.notes and "spatial axes are static" in report.notes[0]
    assert "spatial axes are static" in caplog.text
    assert_agrees(model, path, torch.randn(2, 3, SIDE, SIDE))
    # the size is part of the graph: onnxruntime refuses another one
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    with pytest.raises(InvalidArgument, match=f"(?s)invalid dimensions for input: images.*Got: {2 * SIDE} Expected: {SIDE}"):
        run_onnx(path, torch.randn(1, 3, 2 * SIDE, 2 * SIDE))


def test_refuses_opset_without_antialiased_resize(tmp_path):
    model = build("vit", "lora", "linear")
    path = tmp_path / "old.onnx"
    with pytest.raises(ExportError, match=r"method 'lora' on backbone 'test_vit'.*opset >= 18"):
        export_onnx(model, path, (SIDE, SIDE), opset=17)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_size_the_backbone_cannot_take(tmp_path):
    torch.manual_seed(0)
    model = pm.create_segmentor("test_vit", "spm", K, backbone_kwargs=dict(dynamic_img_size=False)).eval()
    with pytest.raises(ExportError, match=r"method 'spm' on backbone 'test_vit' does not run on a 64x64 input"):
        export_onnx(model, tmp_path / "m.onnx", (SIDE, SIDE))


class _Coarse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Drifting(nn.Module):
    """Each call gives other logits: a Python counter baked into the traced graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) * float(self.calls)


def test_refuses_output_that_is_not_logits_at_input_size(tmp_path):
    with pytest.raises(ExportError, match=r"must return logits \(N, K, 64, 64\).*\(1, 5, 16, 16\)"):
        export_onnx(_Coarse().eval(), tmp_path / "m.onnx", (SIDE, SIDE))
    # the wrapper for mmseg-style models brings them to the input size
    wrapped = SegLogitsAtInputSize(_CoarseMode().eval())
    report = export_onnx(wrapped, tmp_path / "w.onnx", (SIDE, SIDE))
    assert report.max_abs_diff <= 1e-3


class _CoarseMode(_Coarse):
    def forward(self, x: torch.Tensor, mode: str = "tensor") -> torch.Tensor:
        assert mode == "tensor"
        return self.conv(x)


def test_disagreement_is_an_error_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match=r"disagrees with PyTorch: at input \(1, 3, 64, 64\) the max abs logit "
                                          r"difference is [0-9.e+-]+ \(atol 0.001\)"):
        export_onnx(_Drifting().eval(), path, (SIDE, SIDE))
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    # without the check the file is written
    report = export_onnx(_Drifting().eval(), path, (SIDE, SIDE), check=False)
    assert report.max_abs_diff is None and path.stat().st_size == report.file_bytes > 3


def test_bad_arguments(tmp_path):
    model = _Coarse()
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "m.bin", (SIDE, SIDE))
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(model, tmp_path / "m.onnx", (SIDE,))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", (SIDE, SIDE), opset=9)


def _load_cli():
    from promptmatch import export_cli

    return export_cli


def test_cli_from_prompt_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    model = build("resnet", "spm", "multilevel")
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(weights))
    prompts = pm.save_prompts(model, tmp_path / "prompts.safetensors")
    out = tmp_path / "out" / "model.onnx"
    cli = _load_cli()
    rc = cli.main(["--prompts", str(prompts), "--weights", str(weights), "--out", str(out),
                   "--size", str(SIDE), str(SIDE), "--dynamic", "--latency", "2", "--warmup", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "onnxruntime check" in text and "latency" in text
    assert_agrees(model, out, torch.randn(2, 3, 96, 96))
    lat = json.loads(out.with_suffix(".latency.json").read_text())
    assert lat["runs"] == 2 and lat["pytorch_ms_median"] > 0 and lat["onnxruntime_ms_median"] > 0
    assert lat["export"]["dynamic_axes"] == {"0": "batch", "2": "height", "3": "width"}
    # a merged segmentor file: the whole model in one file
    merged = pm.save_segmentor(model, tmp_path / "segmentor.safetensors")
    assert cli.main(["--segmentor", str(merged), "--out", str(tmp_path / "m.onnx"), "--size", str(SIDE), str(SIDE)]) == 0
    assert_agrees(model, tmp_path / "m.onnx", torch.randn(1, 3, SIDE, SIDE))
    # prompts onto another backbone: refused with a hint about the weights
    with pytest.raises(SystemExit, match=r"(?s)fingerprint.*--weights"):
        cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "x.onnx"), "--size", "64", "64"])


def test_cli_from_mmseg_config_and_prompts(tmp_path, capsys):
    """The mmseg route: a PromptEncoderDecoder config (timm backbone + FCN head, SPM) and its
    prompt checkpoint export, and onnxruntime agrees with the mmseg model."""
    pytest.importorskip("mmseg")
    import timm
    from safetensors.torch import save_file

    from promptmatch.mmseg.inference import init_model

    torch.manual_seed(0)
    bb = timm.create_model("test_resnet", num_classes=0)
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"""
_base_ = ['mmseg::_base_/default_runtime.py']
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='promptmatch.PromptEncoderDecoder', method='spm',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=({SIDE}, {SIDE})),
    backbone=dict(type='promptmatch.TimmBackbone', model_name='test_resnet', weights={str(tmp_path / 'bb.safetensors')!r}),
    decode_head=dict(type='FCNHead', in_channels=96, in_index=-1, channels=32, num_convs=1, concat_input=False,
                     num_classes=4, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(), test_cfg=dict(mode='whole'))
""")
    model = init_model(str(cfg), None, device="cpu")
    with torch.no_grad():  # trained-looking prompts and head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    prompts = pm.save_prompts(model, tmp_path / "prompts.safetensors")
    out = tmp_path / "mm.onnx"
    assert _load_cli().main(["--config", str(cfg), "--prompts", str(prompts), "--out", str(out),
                             "--size", str(SIDE), str(SIDE)]) == 0
    assert "argmax agreement 100.000%" in capsys.readouterr().out
