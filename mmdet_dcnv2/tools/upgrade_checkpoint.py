"""Rename an mmdet 1.x checkpoint's deformable-conv offset keys for mmdet 3.x and our layers.

    python -m mmdet_dcnv2.tools.upgrade_checkpoint IN OUT [--force]

mmdet 1.x kept a DCN layer's offset conv beside it (``backbone.layer2.0.conv2_offset.weight``);
mmcv's layers, and ours, hold it inside (``backbone.layer2.0.conv2.conv_offset.weight``). mmcv used
to migrate the keys while loading, but torch (>= 2.1) and mmengine hand each layer only its own
keys, so it no longer sees them. A 1.x checkpoint first needs mmdet's own converter,
``tools/model_converters/upgrade_model_version.py`` (the ``roi_head.`` prefix, the class order),
which leaves the offset keys as they are; this command then renames those.

A key ``P_offset.weight`` / ``P_offset.bias`` is renamed to ``P.conv_offset.*`` where ``P.weight``
is a convolution weight with the same kernel size (the deformable layer beside it) and ``P`` has no
``conv_offset`` yet. Everything else in the file (meta, optimizer state) is kept as it is.
"""

import argparse
import collections
import os
import pickle
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

MMDET_CONVERTER = "tools/model_converters/upgrade_model_version.py"
# mmdet's converter moves these from the top level under roi_head. (its is_head()); a two-stage
# checkpoint with them still at the top level has not been through it.
MMDET_1X_HEADS = ("bbox_head.", "mask_head.", "semantic_head.", "grid_head.", "mask_iou_head.")
_LEGACY_KEY = re.compile(r"^(?P<layer>.+)_offset\.(?P<param>weight|bias)$")


class UpgradeError(Exception):
    """The input cannot be upgraded; the message says why and what to do."""


def rename_dcn_offset_keys(
    state_dict: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str]]]:
    """(the state dict with ``P_offset.*`` renamed to ``P.conv_offset.*``, the (old, new) pairs).
    Key order and torch's ``_metadata`` (module versions) are kept."""
    renames = {}
    for key in state_dict:
        match = _LEGACY_KEY.match(key)
        if match is None:
            continue
        layer = match.group("layer")
        # All of a layer's offset keys or none: a layer that already has a conv_offset is left alone.
        if any(k.startswith(f"{layer}.conv_offset.") for k in state_dict) or not _is_offset_conv_of(state_dict, layer):
            continue
        renames[key] = f"{layer}.conv_offset.{match.group('param')}"
    upgraded = collections.OrderedDict((renames.get(key, key), value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        upgraded._metadata = metadata
    return upgraded, list(renames.items())


def _is_offset_conv_of(state_dict: Dict[str, torch.Tensor], layer: str) -> bool:
    # The offset conv shares the deformable layer's kernel (mmdet 1.x built it so); a 4-D weight
    # named like the layer with another kernel is something else that happens to end in "_offset".
    weight, offset = state_dict.get(f"{layer}.weight"), state_dict.get(f"{layer}_offset.weight")
    if not (isinstance(weight, torch.Tensor) and isinstance(offset, torch.Tensor)):
        return False
    return weight.dim() == offset.dim() == 4 and weight.shape[2:] == offset.shape[2:]


def _load(path: str) -> Tuple[Optional[dict], Dict[str, torch.Tensor]]:
    """(the checkpoint dict holding the state dict, or None for a bare state dict; the state dict)"""
    if not os.path.isfile(path):
        raise UpgradeError(f"IN {path!r} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(error)
        if "Unsupported global" not in detail:  # a damaged file reads as a pickle with a bad opcode
            raise UpgradeError(f"IN {path!r} is not a readable torch checkpoint: {detail}") from error
        # weights_only refuses objects that could run code on load; say so rather than loading them.
        raise UpgradeError(
            f"IN {path!r} holds objects torch.load(weights_only=True) refuses ({detail}); "
            "only plain checkpoints (tensors, numbers, strings, containers) are upgraded"
        ) from error
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for a damaged or foreign file
        raise UpgradeError(
            f"IN {path!r} is not a readable torch checkpoint: {type(error).__name__}: {error}"
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint, checkpoint["state_dict"]
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return None, checkpoint
    raise UpgradeError(
        f"IN {path!r} has no state dict: expected a dict with a 'state_dict' entry (as mmdet "
        "saves) or a dict of tensors"
    )


def _unpickler_detail(error: Exception) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[index + 1] if index + 1 < len(lines) else line)
    return lines[0] if lines else type(error).__name__


def _check_mmdet_converter_ran(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    two_stage = any(key.startswith("rpn_head.") for key in state_dict)
    top_level_heads = sorted({key.split(".")[0] for key in state_dict if key.startswith(MMDET_1X_HEADS)})
    if two_stage and top_level_heads:
        raise UpgradeError(
            f"IN {path!r} is an mmdet 1.x two-stage checkpoint ({', '.join(top_level_heads)} at the top level, "
            f"not under roi_head.): run mmdet's {MMDET_CONVERTER} on it first, then this command on its output"
        )


def upgrade(in_path: str, out_path: str, force: bool = False) -> List[Tuple[str, str]]:
    """Write ``in_path`` with its DCN offset keys renamed to ``out_path``; returns the renames.
    Raises :class:`UpgradeError` (and writes nothing) when there is nothing to do or it cannot."""
    if os.path.exists(out_path) and not force:
        raise UpgradeError(f"OUT {out_path!r} exists; pass --force to overwrite it")
    checkpoint, state_dict = _load(in_path)
    _check_mmdet_converter_ran(state_dict, in_path)
    state_dict, renames = rename_dcn_offset_keys(state_dict)
    if not renames:
        raise UpgradeError(
            f"nothing to rename in {in_path!r}: no '<layer>_offset.weight' beside a '<layer>.weight' "
            "of the same kernel size. Its DCN keys are already mmdet 2.x/3.x ones (or it has no DCN "
            "layer); it loads as it is. OUT was not written"
        )
    result = state_dict if checkpoint is None else dict(checkpoint, state_dict=state_dict)
    # Written beside OUT and moved into place, so a failure leaves no half-written OUT behind.
    folder = os.path.dirname(os.path.abspath(out_path))
    handle, temporary = tempfile.mkstemp(prefix=".upgrade_checkpoint.", dir=folder)
    os.close(handle)
    try:
        torch.save(result, temporary)
        os.replace(temporary, out_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return renames


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mmdet_dcnv2.tools.upgrade_checkpoint",
        description="Rename mmdet 1.x DCN offset keys (conv2_offset.* -> conv2.conv_offset.*). For an mmdet 1.x "
        f"checkpoint, run mmdet's {MMDET_CONVERTER} first (roi_head prefix, class order), then this.",
    )
    parser.add_argument("input", metavar="IN", help="checkpoint to read")
    parser.add_argument("output", metavar="OUT", help="checkpoint to write (not overwritten without --force)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        renames = upgrade(args.input, args.output, force=args.force)
    except UpgradeError as error:
        print(f"upgrade_checkpoint: {error}", file=sys.stderr)
        return 1
    for old, new in renames:
        print(f"{old} -> {new}")
    print(
        f"renamed {len(renames)} keys; wrote {args.output}. (An mmdet 1.x checkpoint also needs mmdet's "
        f"{MMDET_CONVERTER}, before this command.)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
