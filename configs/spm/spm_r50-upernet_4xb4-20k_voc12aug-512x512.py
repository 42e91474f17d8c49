# ResNet-50 V1c (frozen) + SPM + UPerNet
# on Pascal VOC 2012 + SBD aug (21 classes), 20k iterations, batch 4 x 4 processes, crop 512x512.
_base_ = [
    '../_base_/models/spm_r50_upernet.py',
    'mmseg::_base_/datasets/pascal_voc12_aug.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_20k.py',
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=21),
    auxiliary_head=dict(num_classes=21),
    test_cfg=dict(mode='whole'))
