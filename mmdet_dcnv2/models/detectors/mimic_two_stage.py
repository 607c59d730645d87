"""Two-stage detectors that hand their input images to an RCNNMimicRoIHead during ``loss``.

mmdet's RoI heads see only the feature maps (``roi_head.loss(x, rpn_results, data_samples)``), but
R-CNN feature mimicking crops RoIs from the images and runs them through the detector's backbone and
neck. Everything else -- the RPN, ``predict``, ``_forward``, checkpoints -- is the parent class's.
"""

from mmdet.models.detectors import FasterRCNN, MaskRCNN
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from torch import Tensor

from ..roi_heads import RCNNMimicRoIHead


class MimicDetectorMixin:
    """Checks at build time that the RoI head mimics; ``loss`` runs the two-stage loss with the images
    available to it."""

    stock_type = "TwoStageDetector"  # named in errors: the detector to use without mimicking

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.roi_head, RCNNMimicRoIHead):
            raise TypeError(
                f"{type(self).__name__}: roi_head must be an RCNNMimicRoIHead, got "
                f"{type(self.roi_head).__name__} (without mimicking, use {self.stock_type})"
            )

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict:
        with self.roi_head.mimic_source(batch_inputs, self.extract_feat):
            return super().loss(batch_inputs, batch_data_samples)


@MODELS.register_module()
class MimicFasterRCNN(MimicDetectorMixin, FasterRCNN):
    """Faster R-CNN trained with R-CNN feature mimicking; a FasterRCNN at inference."""

    stock_type = "FasterRCNN"


@MODELS.register_module()
class MimicMaskRCNN(MimicDetectorMixin, MaskRCNN):
    """Mask R-CNN trained with R-CNN feature mimicking (on the classification branch only, as in the
    paper); a MaskRCNN at inference."""

    stock_type = "MaskRCNN"
