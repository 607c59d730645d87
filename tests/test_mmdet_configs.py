"""Our configs (configs/dcnv2, shipped in the package): each builds our layers; the paper settings
put MDPool on every RoI layer and train offsets at 0.1x; bad input fails at build time; mixed
precision (CPU autocast, bfloat16) runs a detector step."""

import glob
import os

import pytest
import torch

pytest.importorskip("mmdet")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402

from mmdet_dcnv2.models import MDConv, MDPool  # noqa: E402
from mmdet_tiny import OUR_CONFIGS, rpn_proposals_in_float32, tiny_config, tiny_model_options, write_config  # noqa: E402,E501

PAPER = ["faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco", "mask_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco"]


pytestmark = pytest.mark.usefixtures("mmdet_scope")


def _step(model, autocast=False):
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 64, 64), (3, 64, 48)], num_items=[2, 1], with_mask=True)
    model.train()
    data = model.data_preprocessor(packed, True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = model.parse_losses(model(**data, mode="loss"))
    loss.backward()
    return loss


def test_every_config_states_the_stock_file_it_inherits():
    paths = sorted(glob.glob(os.path.join(OUR_CONFIGS, "*.py")))
    assert len(paths) == 10
    for path in paths:
        text = open(path).read()
        base = text.split("_base_ = '")[1].split("'")[0]
        if base.startswith("./"):  # a variant of one of ours, which states its stock file in turn
            assert os.path.exists(os.path.join(OUR_CONFIGS, base)) and f"Inherits: {base}" in text, path
        else:
            assert base.startswith("mmdet::") and f"Inherits: mmdet {base[len('mmdet::') :]}" in text, path
        assert "custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)" in text


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(OUR_CONFIGS, "*.py"))), ids=os.path.basename)
def test_config_builds_our_layers(path):
    name = os.path.basename(path)[:-3]
    model = MODELS.build(tiny_config(name).model)
    mdconvs = [m for m in model.modules() if isinstance(m, MDConv)]
    pools = [m for m in model.modules() if isinstance(m, MDPool)]
    assert len(mdconvs) == (13 if "mdconv" in name else 0)
    extractors = 2 if name.startswith("mask") and "mdpool" in name else 1 if "mdpool" in name else 0
    assert len(pools) == 4 * extractors
    if name.startswith("mask") and "mdpool" in name:
        assert {layer.output_size for layer in model.roi_head.mask_roi_extractor.roi_layers} == {(14, 14)}


@pytest.mark.parametrize("name", PAPER + [name.replace("_1x", "_mimic_1x") for name in PAPER])
def test_paper_configs_train_offset_convs_at_a_tenth_of_the_rate(name):
    cfg = tiny_config(name)
    model = MODELS.build(cfg.model)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    base_lr = cfg.optim_wrapper.optimizer.lr
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:  # the frozen stem (frozen_stages=1) is not optimised at all
            continue
        expected = 0.1 * base_lr if ".conv_offset." in param_name else base_lr
        assert lr_of[id(param)] == pytest.approx(expected), param_name
    assert sum(".conv_offset." in n for n, _ in model.named_parameters()) == 26


def test_paper_mask_rcnn_trains_a_step_under_cpu_autocast_bfloat16():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(PAPER[1]).model)
    rpn_proposals_in_float32(model.rpn_head)
    dtypes = set()
    for layer in model.modules():
        if isinstance(layer, (MDConv, MDPool)):
            layer.register_forward_hook(lambda m, args, out: dtypes.add((type(m).__name__, out.dtype)))
    loss = _step(model, autocast=True)
    assert torch.isfinite(loss)
    assert dtypes == {("MDConv", torch.bfloat16), ("MDPool", torch.bfloat16)}
    assert model.backbone.layer3[0].conv2.conv_offset.weight.grad.abs().sum() > 0
    assert model.roi_head.mask_roi_extractor.roi_layers[0].offset_fc[4].weight.grad is not None


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"model.backbone.dcn.type": "NoSuchDCN"}, KeyError, "in registry under scope name mmdet"),
        (
            {"model.backbone.dcn.deform_groups": 3},
            ValueError,
            r"in_channels \(16\) must be divisible by deform_groups \(3\)",
        ),
        (
            {"model.roi_head.bbox_roi_extractor.roi_layer.output_channels": 256},
            ValueError,
            "output_channels=256 but the extractor's out_channels is 32",
        ),
    ],
)
def test_bad_config_input_fails_at_build_time(change, error, message):
    cfg = tiny_config(PAPER[0], **change)
    with pytest.raises(error, match=message):
        MODELS.build(cfg.model)


def test_a_user_config_without_our_names_still_gets_the_zoo_on_our_kernels(tmp_path):
    """The README's first recipe: an existing config plus custom_imports."""
    cfg = Config.fromfile(
        write_config(str(tmp_path / "mine.py"), "mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py")
    )
    cfg.merge_from_dict(tiny_model_options(cfg))
    model = MODELS.build(cfg.model)
    assert type(model.backbone.layer4[2].conv2) is MDConv
    assert torch.isfinite(_step(model))
