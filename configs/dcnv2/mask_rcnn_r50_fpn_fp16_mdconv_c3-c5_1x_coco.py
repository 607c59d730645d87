# mmdet's mixed-precision DCNv2 zoo model on mmdet_dcnv2's kernels: the stock config, verbatim
# (AmpOptimWrapper, which needs a GPU). Our ops cast to the offset's dtype, as mmcv's do.
# Inherits: mmdet dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_amp-1x_coco.py (box/mask AP 42.0/37.6 in mmdet's zoo).
_base_ = 'mmdet::dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_amp-1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)
