# mmdet's DCNv2 zoo model (4 deformable groups) on mmdet_dcnv2's kernels: the stock config, verbatim.
# Inherits: mmdet dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py (box AP 41.5 in mmdet's zoo).
_base_ = 'mmdet::dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)
