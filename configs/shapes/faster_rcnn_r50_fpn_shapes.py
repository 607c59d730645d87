# The regular-ConvNet detector of the shapes benchmark (mmdet_dcnv2.datasets.shapes, docs/main_job.md):
# mmdet's faster-rcnn_r50_fpn_1x_coco shrunk for 192x192 images and a CPU, and started as the paper
# starts, from a pretrained backbone. Every DCN variant (faster_rcnn_r50_fpn_*_shapes.py) inherits it,
# so the arms of a comparison differ only in their deformable layers.
# - backbone: mmdet's ResNet-50 at base_channels=16 (stage outputs 64/128/256/512; mmdet's BasicBlock
#   cannot carry DCN), pretrained on the generator's classification stream
#   (python -P -m mmdet_dcnv2.tools.pretrain_backbone / make pretrain, into the cache; the demo makes
#   it on first use), stem + stage 1 frozen, BN frozen (mmdet's recipe for pretrained backbones);
# - 64-channel FPN and heads; anchors 16-256 px for the 16-200 px objects (scales=[4]);
# - RoIs of side < 56 px pooled from P2, 56-112 from P3, 112-224 from P4 (finest_scale=28; mmdet's 56
#   would send everything under 112 px to P2, which no c3-c5 layer feeds directly);
# - SGD (momentum 0.9, weight decay 1e-4) at lr 0.02 for batch 4, linear warm-up, steps at 75% and 90%.
# The recipe was chosen on the val split (docs/main_job.md: "How the recipe was chosen").
# Generate the data first (python -P -m mmdet_dcnv2.datasets.shapes --out data/shapes), or let
# `python -P -m mmdet_dcnv2.tools.demo` do everything.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)

classes = ('triangle', 'star', 'plus', 'ell', 'ring', 'arrow')  # mmdet_dcnv2.datasets.shapes.CLASSES
metainfo = dict(classes=classes)
data_root = 'data/shapes/'
image_size = (192, 192)
batch_size = 4
max_iters = 1200
# The pretrained backbone, found in the cache (~/.cache/mmdet_dcnv2/pretrained) and checked against its sha256
# (mmdet_dcnv2.benchmark.pretrained); the demo's --pretrained PATH replaces it.
pretrained = 'mmdet_dcnv2://pretrained/shapes_resnet50_w16.pth'

model = dict(
    backbone=dict(
        base_channels=16,
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64, finest_scale=28),
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
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline))
# val: for choosing the recipe; test: reported (evaluated once per run); test_rigid: the geometry-off control.
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_test.json',
                 data_prefix=dict(img='test/'), pipeline=test_pipeline))
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric='bbox', classwise=True)
test_evaluator = dict(ann_file=data_root + 'annotations/instances_test.json', metric='bbox', classwise=True)

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4), clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[900, 1080], gamma=0.1),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(window_size=20, by_epoch=False)
randomness = dict(seed=0)
