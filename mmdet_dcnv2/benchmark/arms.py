"""The detectors the benchmark compares (the paper's Table 1 rows at this scale) and their configs."""

import os.path as osp
from typing import Dict, NamedTuple


class Arm(NamedTuple):
    config: str  # under configs/shapes/
    label: str  # as the paper's Table 1 names the row


ARMS: Dict[str, Arm] = {
    "regular": Arm("faster_rcnn_r50_fpn_shapes.py", "regular ConvNet"),
    "dcnv1": Arm("faster_rcnn_r50_fpn_dconv_c3-c5_dpool_shapes.py", "DCNv1 (dconv c3-c5 + dpool)"),
    "dcnv2": Arm("faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py", "DCNv2 (mdconv c3-c5)"),
    "dcnv2_mdpool": Arm("faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_shapes.py", "DCNv2 + mdpool"),
    "dcnv2_mdpool_mimic": Arm(
        "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_shapes.py", "DCNv2 + mdpool + R-CNN feature mimicking"
    ),
}
# Every arm starts from the regular model's initial weights (mmdet_dcnv2.benchmark.pairing).
REFERENCE_ARM = "regular"


def config_path(arm: str) -> str:
    """An arm's config, from the installed package (``.mim/configs``) or, failing that, the source tree."""
    import mmdet_dcnv2

    if arm not in ARMS:
        raise ValueError(f"unknown model {arm!r}; expected one of {sorted(ARMS)}")
    package = osp.dirname(mmdet_dcnv2.__file__)
    for root in (osp.join(package, ".mim", "configs"), osp.join(osp.dirname(package), "configs")):
        path = osp.join(root, "shapes", ARMS[arm].config)
        if osp.exists(path):
            return path
    raise FileNotFoundError(f"config shapes/{ARMS[arm].config} not found in {package}/.mim/configs: reinstall")
