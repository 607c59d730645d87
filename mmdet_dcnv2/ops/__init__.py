"""The DCNv2 operators: torch.library custom ops with CPU and CUDA kernels (no mmcv/mmdet needed)."""

from ._extension import build_info, column_budget, set_column_budget
from .modulated_deform_conv import modulated_deform_conv2d

__all__ = ["build_info", "column_budget", "set_column_budget", "modulated_deform_conv2d"]

try:  # the RoI-pooling op lands in its own module
    from .deform_roi_pool import deform_roi_pool  # noqa: F401

    __all__.append("deform_roi_pool")
except ImportError:  # pragma: no cover
    pass
