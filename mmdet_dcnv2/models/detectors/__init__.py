from .mimic_two_stage import MimicDetectorMixin, MimicFasterRCNN, MimicMaskRCNN

__all__ = ["MimicDetectorMixin", "MimicFasterRCNN", "MimicMaskRCNN"]
