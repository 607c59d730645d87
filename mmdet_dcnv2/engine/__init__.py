from .model_wrappers import unwrap_model
from .optim_wrapper_constructor import DCNv2OptimWrapperConstructor

__all__ = ["DCNv2OptimWrapperConstructor", "unwrap_model"]
