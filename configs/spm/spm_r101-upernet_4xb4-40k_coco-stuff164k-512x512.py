# ResNet-101 V1c (frozen) + SPM + UPerNet
# on COCO-Stuff 164k (171 classes), 40k iterations, batch 4 x 4 processes, crop 512x512.
_base_ = [
    '../_base_/models/spm_r101_upernet.py',
    'mmseg::_base_/datasets/coco-stuff164k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_40k.py',
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=171),
    auxiliary_head=dict(num_classes=171),
    test_cfg=dict(mode='whole'))
