# mmdet's DCNv2 zoo model on mmdet_dcnv2's kernels: the stock config, verbatim. Its
# dcn=dict(type='DCNv2') resolves to mmdet_dcnv2's MDConv once mmdet_dcnv2 is imported.
# Inherits: mmdet dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py (box AP 41.4 in mmdet's zoo).
_base_ = 'mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)
