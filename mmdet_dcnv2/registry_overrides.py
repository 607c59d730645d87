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

mmcv's ``DCNv2``/``DCN`` stay in mmengine's root registry, where mmcv put them, so code building
layers outside any default scope still gets mmcv's. The extractors are needed because mmdet takes
roi_layer classes from ``mmcv.ops`` by name, not from the registry; the optimizer constructor only
adds our layers to what ``dcn_offset_lr_mult`` recognises.

``import mmdet_dcnv2`` calls :func:`apply_from_environment`: :func:`apply` unless
``MMDET_DCNV2_OVERRIDE=0``, logged either way. :func:`restore` puts back exactly what the names held
before, and :func:`overridden` switches for a ``with`` block, so a process can build mmcv's and our
layers from the same stock config. Our own names (``MDConv``, ``DConv``, ...) stay registered
throughout.
"""

import contextlib
import os
from typing import Dict, Iterator, List, Optional, Tuple

from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.logging import print_log
from mmengine.registry import Registry

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

_ABSENT = object()  # the name was not in that registry's own table (lookups fell through to its parent)

# While applied: what each (registry, name) held before, for restore(). None while not applied.
_previous: Optional[Dict[Tuple[Registry, str], object]] = None


def override_enabled() -> bool:
    """What ``MMDET_DCNV2_OVERRIDE`` asks for (default: enabled)."""
    value = os.environ.get(OVERRIDE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{OVERRIDE_ENV} must be 0 (keep mmcv's/mmdet's classes) or 1 (default), got {value!r}")
    return value == "1"


def is_applied() -> bool:
    return _previous is not None


def apply() -> Dict[str, type]:
    """Register our classes under mmdet's stock names; returns name -> class. A no-op when applied."""
    global _previous
    replaced = {name: cls for names in OVERRIDES.values() for name, cls in names.items()}
    if _previous is None:
        previous = {}
        for registry, names in OVERRIDES.items():
            for name, cls in names.items():
                # The registry's own table, not get(): get() would also find the parent's (mmcv's) entry,
                # which stays where it is and must not be copied into mmdet's table on restore.
                previous[registry, name] = registry._module_dict.get(name, _ABSENT)
                registry.register_module(name=name, module=cls, force=True)
        _previous = previous
    return replaced


def restore() -> None:
    """Give the stock names back what they held before :func:`apply`. A no-op when not applied."""
    global _previous
    if _previous is None:
        return
    for (registry, name), entry in _previous.items():
        if entry is _ABSENT:
            registry._module_dict.pop(name, None)
        else:
            registry._module_dict[name] = entry
    _previous = None


@contextlib.contextmanager
def overridden(enabled: bool = True) -> Iterator[None]:
    """``with overridden(False):`` builds mmcv's/mmdet's classes from stock names inside the block
    (``True``: ours); the state before the block comes back after it."""
    was_applied = is_applied()
    _set(enabled)
    try:
        yield
    finally:
        _set(was_applied)


def _set(applied: bool) -> None:
    if applied:
        apply()
    else:
        restore()


def apply_from_environment() -> Dict[str, type]:
    """What import does: :func:`apply` unless ``MMDET_DCNV2_OVERRIDE=0``, and log which it was."""
    if not override_enabled():
        print_log(
            f"mmdet_dcnv2: {OVERRIDE_ENV}=0, mmdet's registry is left as it was (DCNv2/DCN are "
            "mmcv's); use MDConv, DConv, MDPool, DPool and RegistrySingleRoIExtractor by name",
            logger="current",
        )
        return {}
    replaced = apply()
    summary: List[str] = [f"{name} -> {cls.__name__}" for name, cls in replaced.items()]
    print_log(
        f"mmdet_dcnv2: in mmdet's registry {', '.join(summary)} (our kernels); set "
        f"{OVERRIDE_ENV}=0 to keep mmcv's/mmdet's",
        logger="current",
    )
    return replaced


apply_from_environment()
