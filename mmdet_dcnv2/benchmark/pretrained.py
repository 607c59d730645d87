"""The benchmark's pretrained backbone: where it is, and a check that it is the file its record names.

Configs name the shipped weights ``mmdet_dcnv2://pretrained/<file>.pth``: a checkpoint scheme of
mmengine's ``CheckpointLoader`` (registered on ``import mmdet_dcnv2``, like our modules) that resolves
to the installed package's file and checks its sha256 before loading, so ``mim train`` finds it from
any directory and never trains from a damaged file.
"""

import json
import os.path as osp
from typing import Dict, Optional

from mmdet_dcnv2.tools.pretrain_backbone import sha256, sidecar_path

SHIPPED_NAME = "shapes_resnet50_w16.pth"
SCHEME = "mmdet_dcnv2://"


class PretrainedError(RuntimeError):
    """Pretrained weights that cannot be used (the message says why and what to do)."""


def shipped_path() -> str:
    import mmdet_dcnv2

    return osp.join(osp.dirname(mmdet_dcnv2.__file__), "pretrained", SHIPPED_NAME)


def verify(path: Optional[str] = None) -> Dict:
    """``path`` (default: the shipped weights) checked against the sha256 in its sidecar record
    (``<path without .pth>.json``, written by ``mmdet_dcnv2.tools.pretrain_backbone``); returns the
    record with ``path`` added. Raises PretrainedError naming what is wrong."""
    path = osp.abspath(path or shipped_path())
    if not osp.isfile(path):
        raise PretrainedError(
            f"pretrained backbone {path} not found. Make one with `python -P -m "
            f"mmdet_dcnv2.tools.pretrain_backbone --out {path}` (~12 min on 2 cores) or pass --pretrained."
        )
    record_file = sidecar_path(path)
    try:
        with open(record_file) as f:
            record = json.load(f)
        expected = record["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PretrainedError(
            f"the record of the pretrained backbone, {record_file}, is missing or unreadable ({error}); "
            "pretrain_backbone writes it next to the weights"
        ) from None
    actual = sha256(path)
    if actual != expected:
        raise PretrainedError(
            f"pretrained backbone {path} has sha256 {actual[:16]}..., but its record {record_file} says "
            f"{expected[:16]}...: the file was changed or damaged. Restore it (git checkout, reinstall) or "
            "regenerate both with mmdet_dcnv2.tools.pretrain_backbone."
        )
    return dict(record, path=path)


def resolve(filename: str) -> str:
    """``mmdet_dcnv2://pretrained/<name>.pth`` -> the installed package's file."""
    import mmdet_dcnv2

    relative = filename[len(SCHEME) :]
    if not relative.startswith("pretrained/") or ".." in relative.split("/"):
        raise PretrainedError(f"{filename!r}: expected {SCHEME}pretrained/<file>.pth")
    return osp.join(osp.dirname(mmdet_dcnv2.__file__), relative)


def _load_from_package(filename: str, map_location=None):
    import torch

    record = verify(resolve(filename))
    return torch.load(record["path"], map_location=map_location, weights_only=True)


def register_scheme() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    if SCHEME not in CheckpointLoader._schemes:
        CheckpointLoader.register_scheme(prefixes=SCHEME)(_load_from_package)
