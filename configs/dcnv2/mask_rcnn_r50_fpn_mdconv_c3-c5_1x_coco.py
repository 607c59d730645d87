# mmdet's DCNv2 zoo model on mmdet_dcnv2's kernels: the stock config, verbatim.
# Inherits: mmdet dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py (box/mask AP 41.5/37.1 in mmdet's zoo).
_base_ = 'mmdet::dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)
