"""``mim train mmdet_dcnv2 CONFIG``: mmdet's tools/train.py, with mmdet_dcnv2 registered first.

Same arguments as mmdet's tool (it is run as is). Importing mmdet_dcnv2 here means configs without
``custom_imports`` (a stock mmdet config, say) also build our layers.
"""

import os.path as osp
import runpy

import mmdet

import mmdet_dcnv2  # noqa: F401  (registers MDConv, MDPool, ... and the overrides)

MMDET_TOOL = osp.join(osp.dirname(mmdet.__file__), ".mim", "tools", "train.py")

if __name__ == "__main__":
    if not osp.exists(MMDET_TOOL):
        raise SystemExit(f"mmdet's training tool was not found at {MMDET_TOOL}; install mmdet from PyPI")
    runpy.run_path(MMDET_TOOL, run_name="__main__")
