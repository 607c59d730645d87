"""dcn_offset_lr_mult reaches our deformable convs exactly as mmengine applies it to mmcv's."""

import pytest
import torch
from torch import nn

pytest.importorskip("mmdet")
mmcv_ops = pytest.importorskip("mmcv.ops")

from mmengine.optim import DefaultOptimWrapperConstructor, build_optim_wrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from mmdet_dcnv2.engine import DCNv2OptimWrapperConstructor  # noqa: E402
from mmdet_dcnv2.models import DConv, MDConv, MDPool  # noqa: E402

OPTIM = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4))
PARAMWISE = dict(dcn_offset_lr_mult=0.1, bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0)


def _model(mdconv, dconv):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), mdconv(8, 8, 3, bias=True), dconv(8, 8, 3), MDPool(7, 8, 16)
    )


def _settings(constructor, model):
    optimizer = constructor(OPTIM, PARAMWISE)(model).optimizer
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_same_param_groups_as_mmengine_gives_mmcv_layers():
    ours = _settings(DCNv2OptimWrapperConstructor, _model(MDConv, DConv))
    mmcv = _settings(
        DefaultOptimWrapperConstructor, _model(mmcv_ops.ModulatedDeformConv2dPack, mmcv_ops.DeformConv2dPack)
    )
    assert ours == mmcv
    assert ours["2.conv_offset.weight"][0] == pytest.approx(0.001) and ours["3.conv_offset.bias"][0] == pytest.approx(
        0.001
    )
    assert ours["4.offset_fc.0.weight"][0] == pytest.approx(0.01)  # MDPool's fc branches keep the normal rate


def test_mmengine_default_constructor_alone_misses_our_layers():
    """Why the constructor exists: without it the option silently does nothing on our layers."""
    plain = _settings(DefaultOptimWrapperConstructor, _model(MDConv, DConv))
    assert plain["2.conv_offset.weight"][0] == pytest.approx(0.01)


def test_default_constructor_name_resolves_to_ours_in_the_mmdet_scope():
    model = _model(MDConv, DConv)
    with DefaultScope.overwrite_default_scope("mmdet"):
        optimizer = build_optim_wrapper(model, dict(OPTIM, paramwise_cfg=PARAMWISE)).optimizer
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model[2].conv_offset.weight)] == pytest.approx(0.001)
