# The DCNv2 paper's full setting for Mask R-CNN (Table 1, without feature mimicking): modulated
# deformable convs in c3-c5, modulated deformable RoI pooling in both RoI layers (7x7 box, 14x14
# mask; 2x2 samples per bin), offset/mask convs at 0.1x the learning rate (MDPool's fc branches at
# the normal rate). Eight MDPools, ~520M parameters (mostly the 14x14 mask ones); see the README.
# Inherits: mmdet dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py.
_base_ = 'mmdet::dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)

model = dict(
    backbone=dict(dcn=dict(type='MDConv', deform_groups=1, fallback_on_stride=False)),
    roi_head=dict(
        bbox_roi_extractor=dict(
            type='RegistrySingleRoIExtractor',
            roi_layer=dict(_delete_=True, type='MDPool', output_size=7, output_channels=256,
                           sampling_ratio=2)),
        mask_roi_extractor=dict(
            type='RegistrySingleRoIExtractor',
            roi_layer=dict(_delete_=True, type='MDPool', output_size=14, output_channels=256,
                           sampling_ratio=2))))
optim_wrapper = dict(constructor='DCNv2OptimWrapperConstructor', paramwise_cfg=dict(dcn_offset_lr_mult=0.1))
