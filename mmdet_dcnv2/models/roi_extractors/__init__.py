from .registry_roi_extractors import (
    RegistryGenericRoIExtractor,
    RegistryRoILayerMixin,
    RegistrySingleRoIExtractor,
    resolve_roi_layer,
)

__all__ = ["RegistryGenericRoIExtractor", "RegistryRoILayerMixin", "RegistrySingleRoIExtractor", "resolve_roi_layer"]
