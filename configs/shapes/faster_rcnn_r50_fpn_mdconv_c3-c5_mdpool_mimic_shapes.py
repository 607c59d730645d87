# DCNv2 + mdpool + R-CNN feature mimicking (the paper's Table 1/2 full setting, Sec. 3.3): on 16
# foreground RoIs per image, cropped from the image and resized to 64x64 (the paper's 224x224 crops of
# 800-px COCO images, scaled to these 192-px images), both new losses at 0.1x.
_base_ = './faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_shapes.py'

model = dict(
    type='MimicFasterRCNN',
    roi_head=dict(
        type='RCNNMimicRoIHead',
        num_rois=16,
        crop_size=64,
        mimic_on='fg',
        loss_mimic=dict(type='CosineMimicLoss', loss_weight=0.1),
        loss_rcnn_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.1)))
