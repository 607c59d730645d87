"""Every stock mmdet 3.3.0 config that uses DCNv2, loaded verbatim with our custom_imports added,
builds our layers where the registry builds them and trains a step on CPU; with the opt-out,
mmcv's layers are built instead."""

import os

import pytest
import torch

mmdet = pytest.importorskip("mmdet")
mmcv_ops = pytest.importorskip("mmcv.ops")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402

from mmdet_dcnv2 import registry_overrides  # noqa: E402
from mmdet_dcnv2.models import DConv, DPool, MDConv, MDPool  # noqa: E402
from mmdet_tiny import write_config  # noqa: E402

MMDET_CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")

# Every config of mmdet 3.3.0 that names DCNv2 or ModulatedDeformRoIPoolPack (test_the_list_is_complete
# keeps this honest).
# Values: modules built by mmdet heads that call mmcv directly (they stay mmcv's, see the README).
STOCK_DCNV2_CONFIGS = {
    "dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py": (),
    "dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py": (),
    "dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py": (),
    "dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py": (),
    "dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_amp-1x_coco.py": (),
    "fcos/fcos_r50-dcn-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py": (),
    "nas_fcos/nas-fcos_r50-caffe_fpn_fcoshead-gn-head_4xb4-1x_coco.py": (),
    "nas_fcos/nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py": (),
    "regnet/mask-rcnn_regnetx-3.2GF-mdconv-c3-c5_fpn_1x_coco.py": (),
    "solov2/solov2-light_r50-dcn_fpn_ms-3x_coco.py": (),
    "solov2/solov2_r101-dcn_fpn_ms-3x_coco.py": (),
    "solov2/solov2_x101-dcn_fpn_ms-3x_coco.py": (),
    "tood/tood_r101-dconv-c3-c5_fpn_ms-2x_coco.py": (),  # TOODHead's deform_conv2d is functional
    "tood/tood_x101-64x4d-dconv-c4-c5_fpn_ms-2x_coco.py": (),
    "vfnet/vfnet_r101-mdconv-c3-c5_fpn_ms-2x_coco.py": (
        "bbox_head.vfnet_reg_refine_dconv",
        "bbox_head.vfnet_cls_dconv",
    ),
    "vfnet/vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco.py": ("bbox_head.vfnet_reg_refine_dconv", "bbox_head.vfnet_cls_dconv"),
    "vfnet/vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py": (
        "bbox_head.vfnet_reg_refine_dconv",
        "bbox_head.vfnet_cls_dconv",
    ),
    "vfnet/vfnet_x101-32x4d-mdconv-c3-c5_fpn_ms-2x_coco.py": (
        "bbox_head.vfnet_reg_refine_dconv",
        "bbox_head.vfnet_cls_dconv",
    ),
    "vfnet/vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco.py": (
        "bbox_head.vfnet_reg_refine_dconv",
        "bbox_head.vfnet_cls_dconv",
    ),
}
MMCV_DEFORMABLE = (
    mmcv_ops.DeformConv2d,
    mmcv_ops.ModulatedDeformConv2d,
    mmcv_ops.DeformRoIPool,
    mmcv_ops.DeformRoIPoolPack,
    mmcv_ops.ModulatedDeformRoIPoolPack,
)
OURS = (MDConv, DConv, MDPool, DPool)


def _load(tmp_path, stock):
    """The stock file verbatim, plus custom_imports -- what a user's config would add."""
    path = write_config(str(tmp_path / "user_config.py"), os.path.join(MMDET_CONFIGS, stock))
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None  # no pretrained download (forward/backward only)
    return cfg


pytestmark = pytest.mark.usefixtures("mmdet_scope")


def test_the_list_is_complete():
    found = set()
    for folder, _, files in os.walk(MMDET_CONFIGS):
        for name in files:
            text = open(os.path.join(folder, name)).read() if name.endswith(".py") else ""
            if "DCNv2" in text or "ModulatedDeformRoIPoolPack" in text:
                found.add(os.path.relpath(os.path.join(folder, name), MMDET_CONFIGS))
    assert found == set(STOCK_DCNV2_CONFIGS)


@pytest.mark.parametrize("stock", STOCK_DCNV2_CONFIGS)
def test_stock_config_builds_our_layers_and_trains_a_step(tmp_path, stock):
    torch.manual_seed(0)
    model = MODELS.build(_load(tmp_path, stock).model)
    ours = {name: m for name, m in model.named_modules() if isinstance(m, OURS)}
    mmcv_left = {name for name, m in model.named_modules() if isinstance(m, MMCV_DEFORMABLE)}
    assert ours, "no deformable layer of ours was built"
    assert mmcv_left == set(STOCK_DCNV2_CONFIGS[stock])
    if "mdpool" in stock:
        assert all(type(layer) is MDPool for layer in model.roi_head.bbox_roi_extractor.roi_layers)

    MessageHub.get_current_instance().update_info("epoch", 0)  # TOODHead reads it (set by a hook in training)
    packed = demo_mm_inputs(batch_size=1, image_shapes=[(3, 64, 64)], num_items=[2], with_mask=True)
    model.train()
    data = model.data_preprocessor(packed, True)
    loss, _ = model.parse_losses(model(**data, mode="loss"))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for m in ours.values() for p in m.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_stock_dpool_config_builds_dpool(tmp_path):
    model = MODELS.build(_load(tmp_path, "dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py").model)
    assert all(type(layer) is DPool for layer in model.roi_head.bbox_roi_extractor.roi_layers)


def test_opt_out_keeps_mmcv_layers(tmp_path, monkeypatch):
    """MMDET_DCNV2_OVERRIDE=0 at import leaves mmdet's registry alone: stock configs build mmcv's layers."""
    logged = []
    monkeypatch.setattr(registry_overrides, "print_log", lambda message, **kwargs: logged.append(message))
    monkeypatch.setenv(registry_overrides.OVERRIDE_ENV, "0")
    with registry_overrides.overridden(False):  # the registry as a fresh process has it before our import
        assert registry_overrides.apply_from_environment() == {}  # what `import mmdet_dcnv2` runs
        assert not registry_overrides.is_applied()
        built = {}
        for key, stock in {
            "mdconv": "dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py",
            "mdpool": "dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py",
        }.items():
            model = MODELS.build(_load(tmp_path, stock).model)
            built[key] = sorted(
                {
                    type(m).__module__ + "." + type(m).__name__
                    for m in model.modules()
                    if isinstance(m, MMCV_DEFORMABLE + OURS)
                }
            )
        assert MODELS.get("MDConv") is MDConv  # our own names stay registered
    assert built["mdconv"] == ["mmcv.ops.modulated_deform_conv.ModulatedDeformConv2dPack"]
    assert built["mdpool"] == ["mmcv.ops.deform_roi_pool.ModulatedDeformRoIPoolPack"]
    assert any(f"{registry_overrides.OVERRIDE_ENV}=0" in message for message in logged)  # the opt-out is logged
