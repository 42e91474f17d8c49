# SPM prompt tuning of a frozen ViT-B/16 (timm) with the benchmarking protocol's linear
# decoder: dropout + one 1x1 convolution on the last stage's features (stride 16).
#
# The 12 blocks form 4 stages of 3 blocks; an SPM matcher sits after each stage. Only the
# matchers and the decode head train. Weights: a local timm state dict (no download), see
# configs/spm/README.md for how to make it.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    # timm's ViT-B/16 weights (augreg, in21k) are trained on images scaled to [-1, 1]
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    # test images are padded to a multiple of the patch size (the padding is cut off again)
    test_cfg=dict(size_divisor=16))
model = dict(
    type='promptmatch.PromptEncoderDecoder',
    method='spm',
    method_cfg=dict(),
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='promptmatch.TimmBackbone',
        model_name='vit_base_patch16_224',
        weights='pretrain/vit_base_patch16_224.safetensors',
        num_stages=4,
        out_indices=(3, )),
    decode_head=dict(
        type='FCNHead',
        in_channels=768,
        in_index=-1,
        channels=768,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
