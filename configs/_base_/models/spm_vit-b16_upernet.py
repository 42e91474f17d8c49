# SPM prompt tuning of a frozen ViT-B/16 (timm) with UPerNet: the 4 stages (3 blocks each,
# all at stride 16) are rescaled to strides 4/8/16/32 by mmseg's MultiLevelNeck, then
# UPerHead, plus an FCN auxiliary head on the last stage.
#
# The matchers, the neck and both heads train; the backbone is frozen.
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
        out_indices=(0, 1, 2, 3)),
    neck=dict(
        type='MultiLevelNeck',
        in_channels=[768, 768, 768, 768],
        out_channels=768,
        scales=[4, 2, 1, 0.5]),
    decode_head=dict(
        type='UPerHead',
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=768,
        in_index=3,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
