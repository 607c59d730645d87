"""Deformable ConvNets v2 for MMDetection 3.x, on our own C++/CUDA kernels.

`mmdet_dcnv2.ops` needs torch alone. Importing `mmdet_dcnv2` also registers the MMDetection modules
when mmdet is importable (add it to a config's `custom_imports`).
"""

import importlib.util

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401

# Not a try/except ImportError: an installed but broken mmdet should fail loudly, not silently skip.
if importlib.util.find_spec("mmdet") is not None:
    from . import checkpoint, engine, models, registry_overrides  # noqa: E402,F401  (registers, logs)
    from .benchmark.pretrained import register_scheme

    register_scheme()  # mmdet_dcnv2://pretrained/... checkpoints (the shapes configs' backbone)
