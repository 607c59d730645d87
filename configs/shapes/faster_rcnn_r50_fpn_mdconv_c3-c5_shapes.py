# DCNv2 Faster R-CNN for the embedded shapes dataset (mmdet_dcnv2.datasets.shapes): our
# faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco (mmdet's dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py,
# DCNv2 -> our MDConv in every c3-c5 bottleneck) shrunk for 128x128 images and a CPU:
# a narrow ResNet-50 (base_channels=16: stage outputs 64/128/256/512; mmdet's BasicBlock cannot carry
# DCN), trained from scratch (no pretrained download, BN in train mode), 64-channel FPN and heads,
# 16-px smallest anchors for the 14-44 px objects, a short AdamW schedule.
# Generate the data first (python -m mmdet_dcnv2.datasets.shapes --out data/shapes), or let
# `python -m mmdet_dcnv2.tools.demo` do everything.
_base_ = '../dcnv2/faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco.py'

classes = ('triangle', 'star', 'plus', 'ell', 'ring', 'arrow')  # mmdet_dcnv2.datasets.shapes.CLASSES
metainfo = dict(classes=classes)
data_root = 'data/shapes/'
image_size = (128, 128)
max_epochs = 12
batch_size = 8

model = dict(
    backbone=dict(base_channels=16, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=len(classes))),
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300), rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=batch_size, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric='bbox', classwise=True)
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs, eta_min=2e-5),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=10)
randomness = dict(seed=0)
