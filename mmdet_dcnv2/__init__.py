"""Deformable ConvNets v2 for MMDetection 3.x, on our own C++/CUDA kernels.

`mmdet_dcnv2.ops` needs torch alone. Importing `mmdet_dcnv2` also registers the MMDetection modules
when mmdet is importable (add it to a config's `custom_imports`).
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
