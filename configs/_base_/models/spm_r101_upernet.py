# SPM prompt tuning of a frozen ResNet-101 (mmseg ResNetV1c) with UPerNet and an FCN
# auxiliary head; everything else as spm_r50_upernet.py.
_base_ = ['./spm_r50_upernet.py']

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained', checkpoint='pretrain/resnet101_v1c.pth')))
