# DCNv1 on the shapes benchmark (the paper's Table 1 row "DCNv1": dconv c3-c5 + dpool): the regular
# model with an unmodulated deformable 3x3 convolution (our DConv) in every c3-c5 bottleneck and
# deformable RoI pooling (DPool: 7x7 bins, 2x2 samples per bin) at every FPN level.
_base_ = './faster_rcnn_r50_fpn_shapes.py'

model = dict(
    backbone=dict(
        dcn=dict(type='DConv', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)),
    roi_head=dict(
        bbox_roi_extractor=dict(
            type='RegistrySingleRoIExtractor',
            roi_layer=dict(_delete_=True, type='DPool', output_size=7, output_channels=64,
                           deform_fc_channels=256, sampling_ratio=2))))
optim_wrapper = dict(constructor='DCNv2OptimWrapperConstructor', paramwise_cfg=dict(dcn_offset_lr_mult=0.1))
