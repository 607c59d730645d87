"""Paired arms: every parameter two arms share starts identical.

For each seed, the regular model is built and initialised (pretrained backbone, mmdet's init for the
rest) once; its state is saved and every arm loads it before training (mmengine's ``load_from``, after
the arm's own initialisation). What an arm has beyond it -- the offset/mask convs (zero), MDPool's
offset and mask branches, the mimicking classifier -- keeps its own initialisation. Building the regular
model under the seed first also means the DCN arms' extra random draws cannot shift anything shared.
"""

import os
import os.path as osp
from typing import Dict, List

# What an arm may have that the regular model has not (the only keys allowed to miss the initial state).
EXTRA_KEY_MARKERS = (".conv_offset.", ".offset_fc.", ".mask_fc.", "rcnn_cls.", "roi_head.rcnn_")


def build_model(cfg):
    """The detector of ``cfg``, initialised as the Runner would (init_weights), under cfg's seed."""
    from mmdet.registry import MODELS
    from mmengine.runner import set_random_seed

    set_random_seed(cfg.randomness.get("seed", 0), deterministic=False)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def save_initial_state(cfg, out: str) -> str:
    """Build and initialise the regular model of ``cfg``; write its state dict to ``out`` (atomic)."""
    import torch

    state = build_model(cfg).state_dict()
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save({"state_dict": state, "meta": {"note": "paired initial state of the regular model"}}, tmp)
    os.replace(tmp, out)
    return out


def check_compatible(initial: Dict, model) -> List[str]:
    """The keys of ``model`` the initial state does not set (each must be a deformable/mimic extra).
    Raises ValueError if the initial state has a key the model lacks or of another shape: then
    the arms would not share what they should."""
    own = model.state_dict()
    unexpected = sorted(set(initial) - set(own))
    mismatched = sorted(k for k in set(initial) & set(own) if tuple(initial[k].shape) != tuple(own[k].shape))
    missing = sorted(set(own) - set(initial))
    foreign = [k for k in missing if not any(marker in k for marker in EXTRA_KEY_MARKERS)]
    if unexpected or mismatched or foreign:
        raise ValueError(
            "the paired initial state does not fit this model: "
            f"keys it lacks: {unexpected[:5]}, other shapes: {mismatched[:5]}, unshared non-deformable keys: "
            f"{foreign[:5]}"
        )
    return missing
