"""Checkpoints cross between mmcv's modules and ours: strict loads both ways, equal outputs for the
convolution configs (mmcv has no CPU deform RoI pool: mdpool is checked on keys and shapes). Both
sides are built in this process from the same stock config, with the registry override on (ours)
and off (mmcv's)."""

import pytest
import torch

mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint, save_checkpoint  # noqa: E402

from mmdet_dcnv2 import registry_overrides  # noqa: E402
from mmdet_dcnv2.models import DConv, DPool, MDConv, MDPool  # noqa: E402
from mmdet_tiny import tiny_model_options  # noqa: E402

STOCK = {  # name: (mmdet config, compare outputs)
    "mdconv": ("mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", True),
    "group4": ("mmdet::dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py", True),
    "mask_mdconv": ("mmdet::dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", True),
    "mdpool": ("mmdet::dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py", False),
}

pytestmark = pytest.mark.usefixtures("mmdet_scope")


def build(config_path):
    """The tiny model of a config, with whatever the registry currently maps its names to."""
    cfg = Config.fromfile(config_path)
    cfg.merge_from_dict(tiny_model_options(cfg))
    return MODELS.build(cfg.model).eval()


def perturb(model, seed):
    """Offsets of a fraction of a pixel to a few pixels: zero-initialised offset convs would make the
    output comparison vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if "conv_offset" in name else 0.02
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def outputs(model):
    """Backbone, neck and RPN outputs on a fixed image."""
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.extract_feat(image)
        cls_scores, bbox_preds = model.rpn_head(feats)
    return list(feats) + list(cls_scores) + list(bbox_preds)


def deformable_kinds(model):
    return sorted(
        {
            type(m).__module__ + "." + type(m).__name__
            for m in model.modules()
            if "Deform" in type(m).__name__ or isinstance(m, (MDConv, DConv, MDPool, DPool))
        }
    )


@pytest.mark.parametrize("name", STOCK)
def test_checkpoints_cross_between_mmcv_and_ours(name, tmp_path):
    stock, compare = STOCK[name]
    config = tmp_path / f"{name}.py"
    config.write_text(f"_base_ = {stock!r}\n")  # the stock file itself: what the override decides is all

    ours = build(str(config))
    assert any(isinstance(m, (MDConv, MDPool)) for m in ours.modules())
    perturb(ours, seed=1)
    save_checkpoint({"state_dict": ours.state_dict(), "meta": {}}, str(tmp_path / "ours.pth"))

    with registry_overrides.overridden(False):
        theirs = build(str(config))
    kinds = deformable_kinds(theirs)
    expected_kind = "ModulatedDeformRoIPoolPack" if name == "mdpool" else "ModulatedDeformConv2dPack"
    assert kinds and all(k.startswith("mmcv.ops.") for k in kinds), kinds
    assert any(k.endswith(expected_kind) for k in kinds)

    # ours -> mmcv: strict (raises on missing/unexpected keys), and the same outputs
    load_checkpoint(theirs, str(tmp_path / "ours.pth"), strict=True)
    if compare:
        for a, b in zip(outputs(theirs), outputs(ours)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

    # mmcv -> ours: strict, and the same outputs
    perturb(theirs, seed=2)
    save_checkpoint({"state_dict": theirs.state_dict(), "meta": {}}, str(tmp_path / "mmcv.pth"))
    again = build(str(config))
    load_checkpoint(again, str(tmp_path / "mmcv.pth"), strict=True)
    if compare:
        for a, b in zip(outputs(again), outputs(theirs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
