from .rcnn_mimic_roi_head import RCNNMimicRoIHead, crop_and_resize, pool_patches, select_mimic_rois, shared_fc_features

__all__ = ["RCNNMimicRoIHead", "crop_and_resize", "pool_patches", "select_mimic_rois", "shared_fc_features"]
