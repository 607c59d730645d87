from .optim_wrapper_constructor import DCNv2OptimWrapperConstructor

__all__ = ["DCNv2OptimWrapperConstructor"]
