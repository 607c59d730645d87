# mmdet's DCNv2 zoo model (modulated deformable RoI pooling only) on mmdet_dcnv2's kernels: the stock
# config, verbatim. Its roi_layer type 'ModulatedDeformRoIPoolPack' resolves to mmdet_dcnv2's MDPool
# through the registry-aware SingleRoIExtractor. Four MDPools (one per FPN level), ~108M parameters.
# Inherits: mmdet dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py (box AP 38.7 in mmdet's zoo).
_base_ = 'mmdet::dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py'
custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)
