# ViT-B/16 (timm, frozen) + SPM + linear decoder (the benchmarking default)
# on Pascal VOC 2012 + SBD aug (21 classes), 20k iterations, batch 4 x 4 processes, crop 512x512.
_base_ = [
    '../_base_/models/spm_vit-b16_linear.py',
    'mmseg::_base_/datasets/pascal_voc12_aug.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_20k.py',
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=21),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
