"""Make mmdet's stock names resolve to our classes, so unmodified DCNv2 configs run on our kernels.

In mmdet's registries (scope ``mmdet``, which the Runner and mmdet's tools make the default):

==============================  =================================  ==================================
name                            was                                now
==============================  =================================  ==================================
DCNv2                           mmcv ModulatedDeformConv2dPack     MDConv
DCN                             mmcv DeformConv2dPack              DConv
ModulatedDeformRoIPoolPack      mmcv.ops class (not registered)    MDPool
DeformRoIPoolPack               mmcv.ops class (not registered)    DPool
SingleRoIExtractor              mmdet's                            RegistrySingleRoIExtractor
GenericRoIExtractor             mmdet's                            RegistryGenericRoIExtractor
DefaultOptimWrapperConstructor  mmengine's                         DCNv2OptimWrapperConstructor
==============================  =================================  ==================================

mmcv's ``DCNv2``/``DCN`` stay registered in mmengine's root registry, where mmcv put them; mmcv's
``build_conv_layer`` looks in the current default scope (mmdet) first, so inside the Runner our
layers win, while code running outside any default scope still gets mmcv's. The extractors are
needed because mmdet takes roi_layer classes from ``mmcv.ops`` by name, not from the registry; ours
resolve the registry first, then mmcv.ops, so every other roi_layer still works. The optimizer
constructor only adds our layers to what ``dcn_offset_lr_mult`` recognises.

The replacement is logged once at import. ``MMDET_DCNV2_OVERRIDE=0`` in the environment (read at
import) leaves all of these names alone; our own names (``MDConv``, ``DConv``, ``MDPool``,
``DPool``, ``RegistrySingleRoIExtractor``, ``RegistryGenericRoIExtractor``,
``DCNv2OptimWrapperConstructor``) are registered either way.
"""

import os
from typing import Dict, List

from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.logging import print_log

from .engine import DCNv2OptimWrapperConstructor
from .models import DConv, DPool, MDConv, MDPool, RegistryGenericRoIExtractor, RegistrySingleRoIExtractor

OVERRIDE_ENV = "MMDET_DCNV2_OVERRIDE"

OVERRIDES = {
    MODELS: {
        "DCNv2": MDConv,
        "DCN": DConv,
        "ModulatedDeformRoIPoolPack": MDPool,
        "DeformRoIPoolPack": DPool,
        "SingleRoIExtractor": RegistrySingleRoIExtractor,
        "GenericRoIExtractor": RegistryGenericRoIExtractor,
    },
    OPTIM_WRAPPER_CONSTRUCTORS: {"DefaultOptimWrapperConstructor": DCNv2OptimWrapperConstructor},
}


def override_enabled() -> bool:
    value = os.environ.get(OVERRIDE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{OVERRIDE_ENV} must be 0 (keep mmcv's/mmdet's classes) or 1 (default), got {value!r}")
    return value == "1"


def apply_registry_overrides() -> Dict[str, type]:
    """Register our classes under mmdet's stock names (unless opted out); returns what was replaced."""
    if not override_enabled():
        print_log(f"mmdet_dcnv2: {OVERRIDE_ENV}=0, mmdet's registry is left as it was (DCNv2/DCN are "
                  "mmcv's); use MDConv, DConv, MDPool, DPool and RegistrySingleRoIExtractor by name",
                  logger="current")
        return {}
    replaced: Dict[str, type] = {}
    for registry, names in OVERRIDES.items():
        for name, cls in names.items():
            registry.register_module(name=name, module=cls, force=True)
            replaced[name] = cls
    summary: List[str] = [f"{name} -> {cls.__name__}" for name, cls in replaced.items()]
    print_log(f"mmdet_dcnv2: in mmdet's registry {', '.join(summary)} (our kernels); set "
              f"{OVERRIDE_ENV}=0 to keep mmcv's/mmdet's", logger="current")
    return replaced


OVERRIDDEN = apply_registry_overrides()
