"""The MMDetection modules, registered in mmdet's MODELS registry on import."""

from .layers import DConv, DPool, MDConv, MDPool
from .roi_extractors import RegistryGenericRoIExtractor, RegistrySingleRoIExtractor

__all__ = ["DConv", "DPool", "MDConv", "MDPool", "RegistryGenericRoIExtractor", "RegistrySingleRoIExtractor"]
