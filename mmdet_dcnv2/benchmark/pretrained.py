"""The benchmark's pretrained backbone: where it is, and a check that it is the file its record names.

The weights are generated, not shipped: ``make pretrain`` (or the demo's first run) writes them to
the cache, ``$MMDET_DCNV2_CACHE/pretrained/`` (default ``~/.cache/mmdet_dcnv2``, where the mmcv wheel is
cached too). Configs name them ``mmdet_dcnv2://pretrained/<file>.pth``: a checkpoint scheme of
mmengine's ``CheckpointLoader`` (registered on ``import mmdet_dcnv2``, like our modules) that resolves
to that cache file and checks its sha256 before loading, so ``mim train`` finds it from any directory
and never trains from a damaged file.
"""

import json
import os
import os.path as osp
from typing import Dict, Optional

from mmdet_dcnv2.tools.pretrain_backbone import sha256, sidecar_path

DEFAULT_NAME = "shapes_resnet50_w16.pth"
SCHEME = "mmdet_dcnv2://"


class PretrainedError(RuntimeError):
    """Pretrained weights that cannot be used (the message says why and what to do)."""


def cache_dir() -> str:
    root = os.environ.get("MMDET_DCNV2_CACHE") or osp.join(osp.expanduser("~"), ".cache", "mmdet_dcnv2")
    return osp.join(root, "pretrained")


def default_path() -> str:
    """Where ``make pretrain`` and the demo's first run put the benchmark's backbone."""
    return osp.join(cache_dir(), DEFAULT_NAME)


def verify(path: Optional[str] = None) -> Dict:
    """``path`` (default: ``default_path()``) checked against the sha256 in its sidecar record
    (``<path without .pth>.json``, written by ``mmdet_dcnv2.tools.pretrain_backbone``); returns the
    record with ``path`` added. Raises PretrainedError naming what is wrong."""
    path = osp.abspath(path or default_path())
    if not osp.isfile(path):
        raise PretrainedError(
            f"pretrained backbone {path} not found. Make one with `python -P -m "
            f"mmdet_dcnv2.tools.pretrain_backbone --out {path}` (`make pretrain`; ~12 min on 2 cores; the demo "
            "does it on its first run) or pass --pretrained."
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
            f"{expected[:16]}...: the file was changed or damaged. Remove both to have them "
            "regenerated (`make pretrain`, or the demo's next run), or restore them."
        )
    return dict(record, path=path)


def resolve(filename: str) -> str:
    """``mmdet_dcnv2://pretrained/<name>.pth`` -> that file in the cache (``cache_dir()``)."""
    relative = filename[len(SCHEME) :]
    parts = relative.split("/")
    if len(parts) != 2 or parts[0] != "pretrained" or parts[1] in ("", ".", ".."):
        raise PretrainedError(f"{filename!r}: expected {SCHEME}pretrained/<file>.pth")
    return osp.join(cache_dir(), parts[1])


def _load_from_package(filename: str, map_location=None):
    import torch

    record = verify(resolve(filename))
    return torch.load(record["path"], map_location=map_location, weights_only=True)


def register_scheme() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    if SCHEME not in CheckpointLoader._schemes:
        CheckpointLoader.register_scheme(prefixes=SCHEME)(_load_from_package)
