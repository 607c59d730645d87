from .deform_conv import DConv, MDConv
from .deform_roi_pool import DPool, MDPool

__all__ = ["DConv", "DPool", "MDConv", "MDPool"]
