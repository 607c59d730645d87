# The regular-ConvNet baseline for faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py: the same narrow
# ResNet-50 Faster R-CNN, data and schedule, with plain 3x3 convolutions in place of MDConv.
_base_ = './faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py'

model = dict(backbone=dict(dcn=None, stage_with_dcn=(False, False, False, False)))
