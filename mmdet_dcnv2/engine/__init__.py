from .deform_health import DeformHealthHook, measure_deform_health
from .model_wrappers import unwrap_model
from .optim_wrapper_constructor import DCNv2OptimWrapperConstructor

__all__ = ["DCNv2OptimWrapperConstructor", "DeformHealthHook", "measure_deform_health", "unwrap_model"]
