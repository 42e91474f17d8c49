# ResNet-50 V1c (frozen) + SPM + UPerNet
# on Cityscapes (19 classes), 40k iterations, batch 2 x 4 processes, crop 512x1024.
_base_ = [
    '../_base_/models/spm_r50_upernet.py',
    'mmseg::_base_/datasets/cityscapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_40k.py',
]
crop_size = (512, 1024)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=19),
    auxiliary_head=dict(num_classes=19),
    test_cfg=dict(mode='whole'))
