"""PromptEncoderDecoder over every supported mmseg backbone type and common decode heads,
in process: identity at initialisation, frozen backbone, gradients only where they belong."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

from mmengine.config import ConfigDict  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

K = 3
SIDE = 64
BN = dict(type="BN", requires_grad=True)

BACKBONES = {
    "ResNet": (dict(type="ResNet", depth=18, norm_cfg=BN), [64, 128, 256, 512]),
    "ResNetV1c": (dict(type="ResNetV1c", depth=18, norm_cfg=BN), [64, 128, 256, 512]),
    "VisionTransformer": (dict(type="VisionTransformer", img_size=(SIDE, SIDE), embed_dims=32, num_layers=4,
                               num_heads=2, out_indices=(0, 1, 2, 3)), [32] * 4),
    "BEiT": (dict(type="BEiT", img_size=(SIDE, SIDE), embed_dims=32, num_layers=4, num_heads=2,
                  out_indices=(0, 1, 2, 3)), [32] * 4),
    "MAE": (dict(type="MAE", img_size=(SIDE, SIDE), embed_dims=32, num_layers=4, num_heads=2,
                 out_indices=(0, 1, 2, 3)), [32] * 4),
    "SwinTransformer": (dict(type="SwinTransformer", embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                             window_size=4, pretrain_img_size=SIDE), [16, 32, 64, 128]),
    "MixVisionTransformer": (dict(type="MixVisionTransformer", embed_dims=16, num_layers=[1, 1, 1, 1],
                                  num_heads=[1, 2, 5, 8]), [16, 32, 80, 128]),
    "promptmatch.TimmBackbone": (dict(type="promptmatch.TimmBackbone", model_name="test_convnext"), [24, 32, 48, 64]),
}


def head(kind, chans):
    common = dict(num_classes=K, norm_cfg=BN, align_corners=False, channels=16)
    if kind == "uper":
        return dict(type="UPerHead", in_channels=chans, in_index=[0, 1, 2, 3], pool_scales=(1, 2), **common)
    if kind == "fcn":
        return dict(type="FCNHead", in_channels=chans[-1], in_index=3, num_convs=1, concat_input=False, **common)
    if kind == "psp":
        return dict(type="PSPHead", in_channels=chans[-1], in_index=3, pool_scales=(1, 2), **common)
    if kind == "aspp":
        return dict(type="ASPPHead", in_channels=chans[-1], in_index=3, dilations=(1, 2), **common)
    if kind == "dsaspp":
        return dict(type="DepthwiseSeparableASPPHead", in_channels=chans[-1], in_index=3, dilations=(1, 2),
                    c1_in_channels=chans[0], c1_channels=8, **common)
    if kind == "segformer":
        return dict(type="SegformerHead", in_channels=chans, in_index=[0, 1, 2, 3], **common)
    raise ValueError(kind)


def build(model_type, backbone, decode, aux=None, **extra):
    init_default_scope("mmseg")
    cfg = dict(type=model_type, backbone=copy.deepcopy(backbone), decode_head=decode,
               data_preprocessor=dict(type="SegDataPreProcessor", size=(SIDE, SIDE)),
               test_cfg=ConfigDict(mode="whole"), **extra)
    if aux is not None:
        cfg["auxiliary_head"] = aux
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def batch(n=2):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, SIDE, SIDE, generator=g)
    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(SIDE, SIDE), ori_shape=(SIDE, SIDE), pad_shape=(SIDE, SIDE)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, K, (1, SIDE, SIDE), generator=g))
        samples.append(s)
    return images, samples


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_types(name):
    backbone, chans = BACKBONES[name]
    decode = head("uper", chans)
    aux = head("fcn", chans)
    model = build("promptmatch.PromptEncoderDecoder", backbone, decode, aux)
    plain = build("EncoderDecoder", backbone, decode, aux)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("method.")})
    # frozen like the prompted one: requires_grad picks kernels (nn.MultiheadAttention's fast path)
    plain.backbone.requires_grad_(False)
    images, samples = batch()
    model.eval(), plain.eval()
    with torch.no_grad():  # zero-initialised injection: exactly the unprompted model at start
        torch.testing.assert_close(model.encode_decode(images, [s.metainfo for s in samples]),
                                   plain.encode_decode(images, [s.metainfo for s in samples]), rtol=0, atol=0)
    model.train()
    assert not model.backbone.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    losses = model.loss(images, samples)
    assert any(k.startswith("prompt.loss_interim_") for k in losses)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.method.parameters())
    assert all(p.grad is not None for p in model.decode_head.parameters() if p.requires_grad)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["fcn", "psp", "aspp", "dsaspp", "segformer"])
def test_decode_heads(kind):
    backbone, chans = BACKBONES["ResNetV1c"]
    model = build("promptmatch.PromptEncoderDecoder", backbone, head(kind, chans), head("fcn", chans))
    images, samples = batch()
    model.train()
    losses = model.loss(images, samples)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    model.eval()
    with torch.no_grad():
        out = model.predict(images, samples)
    assert out[0].pred_sem_seg.data.shape == (1, SIDE, SIDE)


def test_unknown_backbone_gets_clear_error():
    with pytest.raises(ValueError, match=r"MobileNetV2.*Supported types: ResNet.*stage_modules"):
        build("promptmatch.PromptEncoderDecoder", dict(type="MobileNetV2", norm_cfg=BN),
              head("fcn", [16, 24, 32, 320]))


def test_unknown_backbone_with_stage_modules():
    model = build("promptmatch.PromptEncoderDecoder", dict(type="MobileNetV2", norm_cfg=BN, out_indices=(1, 2, 4, 6)),
                  head("uper", [24, 32, 96, 320]), stage_modules=["layer2", "layer3", "layer5", "layer7"])
    assert [s.channels for s in model.staged.stages] == [24, 32, 96, 320]
    images, samples = batch()
    sum(v for k, v in model.loss(images, samples).items() if "loss" in k).backward()


def test_registered_names_do_not_collide_with_mmseg():
    import promptmatch.mmseg  # noqa: F401
    from mmseg.registry import DATASETS as MMSEG_DATASETS
    from mmseg.registry import MODELS as MMSEG_MODELS

    from promptmatch.registry import DATASETS, HOOKS, MODELS as PM_MODELS

    assert PM_MODELS.scope == DATASETS.scope == HOOKS.scope == "promptmatch"
    assert not set(PM_MODELS.module_dict) & set(MMSEG_MODELS.module_dict)
    assert not set(DATASETS.module_dict) & set(MMSEG_DATASETS.module_dict)


@pytest.mark.parametrize("method", ["linear", "full", "bitfit", "lora", "vpt", "adaptformer", "spm",
                                    "ssf", "mona", "rein", "dora", "side"])
def test_every_method_through_the_mmseg_model(method):
    backbone = dict(type="promptmatch.TimmBackbone", model_name="test_vit", out_indices=(0, 1, 2, 3))
    model = build("promptmatch.PromptEncoderDecoder", backbone, head("uper", [64] * 4), method=method)
    images, samples = batch()
    model.train()
    assert model.backbone.training == (method == "full")
    sum(v for k, v in model.loss(images, samples).items() if "loss" in k).backward()
    trainable_backbone = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    if method not in ("full", "bitfit", "lora", "dora"):  # the others train parts of their own
        assert not trainable_backbone
    else:
        # everything trainable up to the last stage gets a gradient (the final norm is never run)
        in_blocks = [n for n in trainable_backbone if n.startswith("model.blocks.")]
        assert in_blocks and all(model.backbone.get_parameter(n).grad is not None for n in in_blocks)
    model.eval()
    with torch.no_grad():
        assert model.predict(images, samples)[0].pred_sem_seg.data.shape == (1, SIDE, SIDE)


def test_lora_on_mmseg_backbone_is_refused():
    backbone, chans = BACKBONES["ResNetV1c"]
    with pytest.raises(ValueError, match="renames the backbone's state_dict keys.*TimmBackbone"):
        build("promptmatch.PromptEncoderDecoder", backbone, head("fcn", chans), method="lora")


LEAN_REFUSED = {"VisionTransformer", "BEiT", "MAE", "SwinTransformer", "MixVisionTransformer"}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_lean_spm_trains_or_is_refused_per_backbone_type(name):
    """SPM v4 (lean: the backbone runs without autograd) on each mmseg backbone type: where the
    backbone returns its stage outputs, every matcher parameter gets a gradient and no backbone
    parameter does; where it computes its outputs after the last stage (a norm, a reshape:
    mmseg's transformers; MiT reshapes its stage outputs, and a view made without autograd
    still says it requires a gradient), the first training step is refused with the fix."""
    import promptmatch as pm

    backbone, chans = BACKBONES[name]
    model = build("promptmatch.PromptEncoderDecoder", backbone, head("uper", chans),
                  method_cfg=pm.SPMConfig.v4().to_dict())
    images, samples = batch()
    model.train()
    if name in LEAN_REFUSED:
        with pytest.raises(RuntimeError, match="computed after its last stage.*backprop_backbone=True"):
            model.loss(images, samples)
        return
    sum(v for k, v in model.loss(images, samples).items() if "loss" in k).backward()
    assert all(p.grad is not None for p in model.method.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_default_spm_trains_on_every_backbone_type(name):
    """SPM's defaults (v4, lean) on each mmseg backbone type: lean where the backbone returns its
    stage outputs; where lean could not train (LEAN_REFUSED) the model is built backpropagating
    through the backbone instead, says so, and its first training step reaches the matchers. A
    config that chose lean explicitly is refused as above, never switched."""
    import promptmatch as pm

    backbone, chans = BACKBONES[name]
    import logging

    from mmengine.logging import MMLogger

    logger, said = MMLogger.get_current_instance(), []
    catch = logging.Handler(logging.INFO)
    catch.emit = lambda record: said.append(record.getMessage())
    level = logger.level
    logger.addHandler(catch)
    logger.setLevel(logging.INFO)
    try:
        model = build("promptmatch.PromptEncoderDecoder", backbone, head("uper", chans))
    finally:
        logger.removeHandler(catch)
        logger.setLevel(level)
    refused = name in LEAN_REFUSED
    assert model.method.config.backprop_backbone is refused
    assert model.method.config == (pm.SPMConfig.v4(backprop_backbone=True) if refused else pm.SPMConfig())
    assert any("lean mode (the default) could not train" in m for m in said) is refused
    images, samples = batch()
    model.train()
    sum(v for k, v in model.loss(images, samples).items() if "loss" in k).backward()
    grads = [p.grad for n, p in model.method.named_parameters() if n.startswith("out_proj.")]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.backbone.parameters())
    if not refused:  # these return each stage's output as it is: every matcher's prompt reaches the head
        assert sorted(model.method.out_proj) == [str(i) for i in range(len(model.staged.stages))]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind, aux, prompted", [("fcn", None, ["3"]), ("fcn", ("fcn2", 2), ["2", "3"]),
                                                 ("uper", None, ["0", "1", "2", "3"])])
def test_lean_decoder_prompts_only_where_a_head_reads(kind, aux, prompted):
    """In lean mode an observer's prompt for the head is kept only at the levels the decode and
    auxiliary heads read (their in_index): a prompt nothing reads would be a parameter without a
    gradient (DistributedDataParallel's unused-parameter error, an inflated checkpoint). Built
    under inference mode (a server) it is the same model."""
    import promptmatch as pm

    backbone, chans = BACKBONES["ResNetV1c"]
    aux_head = None
    if aux is not None:
        aux_head = dict(head("fcn", chans), in_channels=chans[aux[1]], in_index=aux[1])
    with torch.inference_mode():
        built_in_inference = build("promptmatch.PromptEncoderDecoder", backbone, head(kind, chans), aux=aux_head)
    model = build("promptmatch.PromptEncoderDecoder", backbone, head(kind, chans), aux=aux_head,
                  method_cfg=pm.SPMConfig.v4())
    for m in (model, built_in_inference):
        assert m.method.config == pm.SPMConfig.v4()
        assert sorted(m.method.out_proj) == prompted
    images, samples = batch()
    model.train()
    sum(v for k, v in model.loss(images, samples).items() if "loss" in k).backward()
    assert [n for n, p in model.method.named_parameters() if p.requires_grad and p.grad is None] == []
