"""MDConv, DConv, MDPool, DPool: mmcv's contracts (constructor, attributes, keys, init) on our kernels."""

import warnings

import pytest
import torch
import torchvision

mmcv_ops = pytest.importorskip("mmcv.ops")
pytest.importorskip("mmdet")

from mmcv.cnn import ConvModule  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from mmdet_dcnv2.models import DConv, DPool, MDConv, MDPool  # noqa: E402

# (in, out, kernel, stride, padding, dilation, groups, deform_groups)
CONV_CASES = [
    (8, 16, 3, 1, 1, 1, 1, 1),
    (8, 12, 3, 2, 1, 1, 2, 2),
    (16, 8, 3, 1, 2, 2, 1, 4),
    (6, 6, (3, 1), 1, (1, 0), 1, 3, 1),
]


def _randomise_offsets(layer, scale=0.3):
    """Offsets of a few pixels (and masks away from 0.5), so the deformable sampling matters."""
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, scale)
        layer.conv_offset.bias.normal_(0, 1.0)


def _compare_with_mmcv(ours, theirs, in_channels):
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomise_offsets(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, in_channels, 9, 11)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.conv_offset.weight.grad, theirs.conv_offset.weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", CONV_CASES)
def test_mdconv_is_mmcv_modulated_deform_conv_pack(case):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, dg = case
    ours = MDConv(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, deform_groups=dg)
    theirs = mmcv_ops.ModulatedDeformConv2dPack(
        cin, cout, k, stride=s, padding=p, dilation=d, groups=g, deform_groups=dg
    )
    assert (
        ours.conv_offset.out_channels
        == theirs.conv_offset.out_channels
        == 3 * dg * ours.kernel_size[0] * ours.kernel_size[1]
    )
    _compare_with_mmcv(ours, theirs, cin)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_dconv_is_mmcv_deform_conv_pack(case):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, dg = case
    ours = DConv(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, deform_groups=dg)
    theirs = mmcv_ops.DeformConv2dPack(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, deform_groups=dg)
    assert ours.bias is None and ours.conv_offset.out_channels == 2 * dg * 9
    _compare_with_mmcv(ours, theirs, cin)


@pytest.mark.parametrize("cls", [MDConv, DConv])
def test_offset_conv_starts_at_zero_in_conv_module(cls):
    # ConvModule reads nn.Conv2d's attributes from its conv and, seeing init_weights, leaves it alone.
    with DefaultScope.overwrite_default_scope("mmdet"):
        module = ConvModule(
            8, 8, 3, padding=1, conv_cfg=dict(type=cls.__name__), norm_cfg=dict(type="GN", num_groups=4)
        )
    assert type(module.conv) is cls and module.conv.bias is None  # bias='auto' with a norm layer
    for name in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "transposed",
        "output_padding",
        "groups",
    ):
        assert hasattr(module.conv, name), name
    assert not module.conv.conv_offset.weight.any() and not module.conv.conv_offset.bias.any()
    assert module(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)


@pytest.mark.parametrize("cls", [MDConv, DConv])
def test_parent_kaiming_init_cfg_does_not_leave_offsets_nonzero(cls):
    """mmdet's ResNet Kaiming-initialises every nn.Conv2d (conv_offset too); our init_weights re-zeroes."""
    from mmengine.model import BaseModule

    class Block(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=dict(type="Kaiming", layer="Conv2d"))
            self.conv2 = cls(8, 8, 3, padding=1)

    block = Block()
    block.init_weights()
    assert not block.conv2.conv_offset.weight.any() and not block.conv2.conv_offset.bias.any()
    assert block.conv2.weight.any()


def test_deformable_groups_alias_is_accepted_with_a_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = MDConv(8, 8, 3, padding=1, deformable_groups=2)
    assert layer.deform_groups == 2 and layer.conv_offset.out_channels == 3 * 2 * 9
    assert any(issubclass(w.category, DeprecationWarning) and "deformable_groups" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(in_channels=6, out_channels=8, deform_groups=4),
            r"in_channels \(6\) must be divisible by deform_groups \(4\)",
        ),
        (dict(in_channels=8, out_channels=6, groups=4), r"out_channels \(6\) must be divisible by groups \(4\)"),
        (dict(in_channels=8, out_channels=8, deform_groups=0), r"deform_groups \(0\)"),
    ],
)
@pytest.mark.parametrize("cls", [MDConv, DConv])
def test_bad_channel_splits_fail_at_build_time(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(kernel_size=3, **kwargs)


def test_mdconv_under_cpu_autocast_runs_in_bfloat16():
    layer = MDConv(8, 8, 3, padding=1)
    _randomise_offsets(layer, 0.05)
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = layer(x)
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.conv_offset.weight.grad.abs().sum() > 0


# --- RoI pooling --------------------------------------------------------------------------------


def _rois():
    return torch.tensor([[0, 2.0, 3.0, 30.0, 25.0], [1, 10.5, 4.0, 20.0, 31.0], [0, 0.0, 0.0, 31.0, 31.0]])


@pytest.mark.parametrize(
    "ours_cls, theirs_cls", [(MDPool, mmcv_ops.ModulatedDeformRoIPoolPack), (DPool, mmcv_ops.DeformRoIPoolPack)]
)
def test_deform_roi_pool_packs_have_mmcv_keys_and_init(ours_cls, theirs_cls):
    ours = ours_cls(output_size=7, output_channels=4, deform_fc_channels=16, spatial_scale=0.5)
    theirs = theirs_cls(output_size=7, output_channels=4, deform_fc_channels=16, spatial_scale=0.5)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.output_size == (7, 7)  # mmdet's extractors read it as a tuple
    # Only the last Linear of each branch starts at zero; zeroing the hidden ones would freeze them.
    last_layers = [ours.offset_fc[4]] + ([ours.mask_fc[2]] if ours_cls is MDPool else [])
    for linear in [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]:
        assert (not linear.weight.any()) == (linear in last_layers)


@pytest.mark.parametrize("cls, scale", [(MDPool, 0.5), (DPool, 1.0)])
def test_deform_roi_pool_at_init_is_roi_align_times_the_initial_mask(cls, scale):
    """Zero offsets, masks sigmoid(0) = 0.5 (MDPool): the layer pools like RoIAlign (aligned)."""
    torch.manual_seed(0)
    layer = cls(output_size=(7, 5), output_channels=4, deform_fc_channels=16, spatial_scale=0.5, sampling_ratio=2)
    x = torch.randn(2, 4, 16, 16)
    expected = torchvision.ops.roi_align(x, _rois(), (7, 5), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(layer(x, _rois()), expected * scale, rtol=1e-5, atol=1e-5)


def test_mdpool_learns_offsets_and_masks_and_handles_no_rois():
    torch.manual_seed(0)
    layer = MDPool(output_size=7, output_channels=4, deform_fc_channels=16, spatial_scale=0.5)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    layer(x, _rois()).square().sum().backward()
    assert layer.offset_fc[4].weight.grad.abs().sum() > 0 and layer.mask_fc[2].weight.grad.abs().sum() > 0
    empty = layer(x, torch.zeros(0, 5))
    assert empty.shape == (0, 4, 7, 7)


def test_mdpool_rejects_a_feature_map_with_other_channels():
    layer = MDPool(output_size=7, output_channels=4, deform_fc_channels=16)
    with pytest.raises(ValueError, match="output_channels=4 but got a feature map with 8 channels"):
        layer(torch.randn(1, 8, 8, 8), _rois()[:1])


def test_mdpool_sizes_stated_in_the_docs():
    """The parameter counts the README quotes for mmdet's 256-channel, 1024-unit MDPool."""

    def count(output_size):
        shapes = MDPool(output_size, 256).state_dict()
        return sum(v.numel() for v in shapes.values())

    assert round(count(7) / 1e6, 1) == 26.9 and round(count(14) / 1e6, 1) == 104.4
