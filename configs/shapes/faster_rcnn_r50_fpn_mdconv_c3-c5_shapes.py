# DCNv2 on the shapes benchmark: faster_rcnn_r50_fpn_shapes.py with a modulated deformable 3x3
# convolution (our MDConv; mmdet's DCNv2 zoo model's placement) in every c3-c5 bottleneck: 13 layers.
# Their offset/mask convs start at zero (a regular convolution with masks at 0.5) and learn at 0.1x the
# learning rate, as in the paper; everything else starts from the same weights as the regular model
# (the demo loads the regular model's initial state into it: docs/main_job.md, "Paired arms").
_base_ = './faster_rcnn_r50_fpn_shapes.py'

model = dict(
    backbone=dict(
        dcn=dict(type='MDConv', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
optim_wrapper = dict(constructor='DCNv2OptimWrapperConstructor', paramwise_cfg=dict(dcn_offset_lr_mult=0.1))
