# The DCNv2 paper's best Faster R-CNN (Table 2, 42.4 AP): its full setting -- mdconv in c3-c5, MDPool
# (2x2 samples per bin), offset/mask convs at 0.1x lr -- trained with R-CNN feature mimicking on
# foreground RoIs: 32 per image, cropped to 224x224, both new losses at 0.1x. Inference and the
# checkpoint's keys are those of the base config (plus the R-CNN classifier, used in training only).
# Inherits: ./faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py
#   (-> mmdet dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py).
_base_ = './faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py'
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
