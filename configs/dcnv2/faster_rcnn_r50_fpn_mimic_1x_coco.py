# The DCNv2 paper's control experiment (Table 2, 35.6 -> 35.8 AP): R-CNN feature mimicking on a
# regular ConvNet -- stock R50-FPN Faster R-CNN with RoIAlign, no deformable layers -- with the same
# mimicking settings as the DCNv2 configs (32 foreground RoIs per image, 224x224, losses at 0.1x).
# Inherits: mmdet faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)

model = dict(
    type='MimicFasterRCNN',
    roi_head=dict(
        type='RCNNMimicRoIHead',
        num_rois=32,
        crop_size=224,
        mimic_on='fg',
        loss_mimic=dict(type='CosineMimicLoss', loss_weight=0.1),
        loss_rcnn_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.1)))
