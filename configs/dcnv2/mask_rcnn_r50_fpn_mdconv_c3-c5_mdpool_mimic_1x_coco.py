# The DCNv2 paper's best Mask R-CNN (Table 2, 43.9 box / 38.1 mask AP): its full setting -- mdconv in
# c3-c5, MDPool on both RoI layers (7x7 box, 14x14 mask; 2x2 samples per bin), offset/mask convs at
# 0.1x lr -- trained with R-CNN feature mimicking on foreground RoIs (32 per image, 224x224 crops,
# losses at 0.1x), on the classification branch only, as in the paper.
# Inherits: ./mask_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py
#   (-> mmdet dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py).
_base_ = './mask_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)

model = dict(
    type='MimicMaskRCNN',
    roi_head=dict(
        type='RCNNMimicRoIHead',
        num_rois=32,
        crop_size=224,
        mimic_on='fg',
        loss_mimic=dict(type='CosineMimicLoss', loss_weight=0.1),
        loss_rcnn_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.1)))
