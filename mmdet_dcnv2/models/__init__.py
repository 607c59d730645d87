"""The MMDetection modules, registered in mmdet's MODELS registry on import."""

from .detectors import MimicFasterRCNN, MimicMaskRCNN
from .layers import DConv, DPool, MDConv, MDPool
from .losses import CosineMimicLoss
from .roi_extractors import RegistryGenericRoIExtractor, RegistrySingleRoIExtractor
from .roi_heads import RCNNMimicRoIHead

__all__ = [
    "CosineMimicLoss",
    "DConv",
    "DPool",
    "MDConv",
    "MDPool",
    "MimicFasterRCNN",
    "MimicMaskRCNN",
    "RCNNMimicRoIHead",
    "RegistryGenericRoIExtractor",
    "RegistrySingleRoIExtractor",
]
