"""Load mmdet 1.x checkpoints, whose offset convs sit beside the layer: ``conv2_offset.*``.

mmcv renamed them to ``conv2.conv_offset.*`` (module version 2) and migrates old keys inside the
layer's ``_load_from_state_dict``. That stopped working when torch (>= 2.1) and mmengine's loader
began handing each child only the keys under its own prefix: the layer never sees its sibling's keys,
and the parent reports them as unexpected. So the migration runs at the parent instead, as a
load-state-dict pre-hook attached whenever one of our deformable layers becomes a submodule.
"""

import functools
from typing import Type

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

_MIGRATED_CLASSES: tuple = ()


def _rename_sibling_offset_keys(parent: nn.Module, state_dict: dict, prefix: str, *args, child_name: str) -> None:
    """``<prefix><child>_offset.<p>`` -> ``<prefix><child>.conv_offset.<p>`` unless already present."""
    for param in ("weight", "bias"):
        old, new = f"{prefix}{child_name}_offset.{param}", f"{prefix}{child_name}.conv_offset.{param}"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


def _attach_to_parent(parent: nn.Module, name: str, submodule) -> None:
    # torch calls this for every submodule registration (attribute assignment or add_module) in the
    # process; it acts only on our deformable layers and leaves the submodule as it is.
    if isinstance(submodule, _MIGRATED_CLASSES):
        parent._register_load_state_dict_pre_hook(
            functools.partial(_rename_sibling_offset_keys, child_name=name), with_module=True)
    return None


def migrate_legacy_offset_keys_at_parent(*classes: Type[nn.Module]) -> None:
    """Give every future parent of an instance of ``classes`` the legacy-key migration hook."""
    global _MIGRATED_CLASSES
    if not _MIGRATED_CLASSES:
        register_module_module_registration_hook(_attach_to_parent)
    _MIGRATED_CLASSES = tuple(dict.fromkeys(_MIGRATED_CLASSES + classes))
