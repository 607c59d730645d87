"""The DCNv2 operators: torch.library custom ops with CPU and CUDA kernels (no mmcv/mmdet needed)."""

from ._extension import build_info, column_budget, set_column_budget
from .deform_roi_pool import deform_roi_pool
from .modulated_deform_conv import modulated_deform_conv2d

__all__ = ["build_info", "column_budget", "set_column_budget", "deform_roi_pool", "modulated_deform_conv2d"]
