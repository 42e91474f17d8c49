# ViT-B/16 (timm, frozen) + SPM + linear decoder (the benchmarking default)
# on Pascal Context (59 classes), 40k iterations, batch 4 x 4 processes, crop 480x480.
_base_ = [
    '../_base_/models/spm_vit-b16_linear.py',
    'mmseg::_base_/datasets/pascal_context_59.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_40k.py',
]
crop_size = (480, 480)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=59),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(320, 320)))
