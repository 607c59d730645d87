"""ONNX export of our layers and ops (mmdet_dcnv2.onnx): each exported once with dynamic shapes, checked
by onnx.checker, run in ONNX Runtime and onnx's reference evaluator at two input sizes, compared with
PyTorch in float32."""

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

from mmdet_dcnv2.onnx import MIN_OPSET, export, ort_session, run_ort, run_reference
from mmdet_dcnv2.ops import deform_roi_pool

ATOL = 1e-4
STANDARD_DOMAINS = ("", "ai.onnx")


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= set(STANDARD_DOMAINS) and not model.functions
    return model


def _max_diff(expected: torch.Tensor, actual: np.ndarray) -> float:
    assert tuple(expected.shape) == actual.shape
    return float((expected - torch.from_numpy(actual)).abs().max())


# (layer, groups, deform_groups, stride, padding, dilation, bias, opset)
LAYER_CASES = [
    ("MDConv", 2, 2, 2, 1, 1, True, 20),
    ("MDConv", 1, 1, 1, 2, 2, False, 19),
    ("DConv", 2, 2, 1, 1, 1, True, 22),
    ("DConv", 1, 1, 2, 0, 1, False, 20),
]


@pytest.mark.parametrize("name,groups,deform_groups,stride,padding,dilation,bias,opset", LAYER_CASES)
def test_layer_exports_to_deform_conv(name, groups, deform_groups, stride, padding, dilation, bias, opset):
    from mmdet_dcnv2.models import layers

    torch.manual_seed(0)
    layer = getattr(layers, name)(
        4,
        6,
        3,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        deform_groups=deform_groups,
        bias=bias,
    ).eval()
    with torch.no_grad():  # the offset conv starts at zero: give it offsets of a few pixels and masks != 0.5
        torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
        torch.nn.init.normal_(layer.conv_offset.bias, std=1.0)
        if bias:
            torch.nn.init.normal_(layer.bias)
    # Small maps: onnx's reference evaluator runs DeformConv in Python loops.
    sizes = [(2, 4, 9, 7), (1, 4, 6, 11)]
    model = _checked(
        export(
            layer,
            (torch.randn(*sizes[0]),),
            dynamic_shapes={"x": {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}},
            opset_version=opset,
        )
    )
    assert [n.op_type for n in model.graph.node].count("DeformConv") == 1
    assert model.opset_import[0].version == opset and model.ir_version == 10
    deform = next(n for n in model.graph.node if n.op_type == "DeformConv")
    assert len([i for i in deform.input if i]) == 3 + bias + (name == "MDConv")  # X, W, offset [, B] [, mask]
    session = ort_session(model)
    for size in sizes:
        x = torch.randn(*size)
        with torch.no_grad():
            expected = layer(x)
        assert _max_diff(expected, run_ort(session, [x])[0]) <= ATOL
        assert _max_diff(expected, run_reference(model, [x])[0]) <= ATOL


def test_export_refuses_opsets_without_deform_conv():
    from mmdet_dcnv2.onnx import custom_translation_table

    assert set(custom_translation_table()) == {
        torch.ops.mmdet_dcnv2.modulated_deform_conv2d.default,
        torch.ops.mmdet_dcnv2.deform_roi_pool.default,
    }
    with pytest.raises(ValueError, match=f"opset_version must be an int >= {MIN_OPSET}"):
        export(torch.nn.Identity(), (torch.zeros(1),), opset_version=18)


# ---- deformable RoI pooling -> RoiAlign ----

SCALE, OUT, GAMMA = 0.5, (7, 7), 0.1


class _Pool(torch.nn.Module):
    def __init__(self, deform: bool, sampling_ratio: int):
        super().__init__()
        self.deform, self.sampling_ratio = deform, sampling_ratio

    def forward(self, x, rois, offset):
        return deform_roi_pool(x, rois, offset if self.deform else None, OUT, SCALE, self.sampling_ratio, GAMMA)


def _rois(generator, count, integer_bins):
    """(count, 5) RoIs on a 2-image batch of 20x24 maps (image coordinates = map / SCALE). With
    integer_bins their bins are exactly 1, 2 or 3 map pixels: where ceil(bin size) can flip."""
    batch = torch.randint(0, 2, (count, 1), generator=generator).float()
    x1 = torch.rand(count, 1, generator=generator) * 30 + torch.rand(count, 1, generator=generator)
    y1 = torch.rand(count, 1, generator=generator) * 25
    if integer_bins:
        w, h = (OUT[1] * torch.randint(1, 4, (count, 1), generator=generator).float() / SCALE for _ in range(2))
    else:
        w, h = torch.rand(count, 1, generator=generator) * 24, torch.rand(count, 1, generator=generator) * 20
    return torch.cat([batch, x1, y1, x1 + w, y1 + h], 1)


def _naive_ceil_flips(rois: torch.Tensor, offset: torch.Tensor) -> int:
    """Bins where RoiAlign, given the plain shifted bin (x1 + 0.5, x1 + 0.5 + bin), would take a
    different adaptive grid than the op: float32 arithmetic in the op's order (numpy float32 is IEEE
    single precision, as ORT's is)."""
    r, off = rois.numpy(), offset.numpy()
    flips = 0
    for axis, (lo, hi), bins in ((0, (1, 3), OUT[1]), (1, (2, 4), OUT[0])):
        half = np.float32(0.5)
        start = r[:, lo] * np.float32(SCALE) - half
        size = (r[:, hi] * np.float32(SCALE) - half) - start
        bin_size = (size / np.float32(bins))[:, None, None]
        index = np.arange(bins, dtype=np.float32).reshape((1, bins, 1) if axis else (1, 1, bins))
        edge = (start[:, None, None] + (np.float32(GAMMA) * size)[:, None, None] * off[:, axis]) + index * bin_size
        first = edge + half
        width = ((first + bin_size) - half) - (first - half)
        flips += int((np.ceil(width) != np.ceil(bin_size)).sum())
    return flips


@pytest.fixture(scope="module")
def pool_models():
    """One dynamic-shape export per (deform, sampling_ratio): the number of RoIs, images and the map
    size vary (the channels are fixed, as a model's are)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 20, 24, generator=generator)
    rois = _rois(generator, 3, False)
    offset = torch.randn(3, 2, *OUT, generator=generator)
    models = {}
    for deform in (False, True):
        for sampling_ratio in (0, 2):
            module = _Pool(deform, sampling_ratio)
            model = _checked(
                export(
                    module,
                    (x, rois, offset),
                    dynamic_shapes={
                        "x": {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},
                        "rois": {0: Dim("rois")},
                        "offset": {0: Dim("rois")},
                    },
                )
            )
            ops = {n.op_type for n in model.graph.node}
            assert "RoiAlign" in ops and not ops & {"GridSample", "Loop"}
            models[deform, sampling_ratio] = module, model, ort_session(model)
    return models


@pytest.mark.parametrize("deform", [False, True], ids=["plain", "offset"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_pool_matches_op(pool_models, deform, sampling_ratio):
    module, model, session = pool_models[deform, sampling_ratio]
    generator = torch.Generator().manual_seed(1)
    for x, count, integer_bins in (
        (torch.randn(2, 4, 20, 24, generator=generator), 400, True),
        (torch.randn(3, 4, 13, 31, generator=generator), 60, False),
    ):
        rois = _rois(generator, count, integer_bins)
        rois[:, 0] = rois[:, 0].clamp(max=x.shape[0] - 1)
        offset = torch.randn(count, 2, *OUT, generator=generator) * 0.3
        expected = module(x, rois, offset)
        assert _max_diff(expected, run_ort(session, [x, rois, offset])[0]) <= ATOL
        # The reference evaluator pools in Python: a few RoIs are enough there.
        few = [x, rois[:12], offset[:12]]
        assert _max_diff(module(*few), run_reference(model, few)[0]) <= ATOL
        if deform and sampling_ratio == 0 and integer_bins:
            # The case the far-corner correction exists for must really be in the data.
            assert _naive_ceil_flips(rois, offset) > 100


@pytest.mark.parametrize("deform", [False, True], ids=["plain", "offset"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_pool_non_finite_and_empty_rois_pool_to_zero(pool_models, deform, sampling_ratio):
    """Our op pools non-finite RoIs (and, with offsets, non-finite offsets) to zeros; ORT's RoiAlign
    refuses them ("All 'rois' values must be finite"), so the export replaces them first."""
    module, model, session = pool_models[deform, sampling_ratio]
    x = torch.randn(2, 4, 20, 24, generator=torch.Generator().manual_seed(2))
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor(
        [
            [0, nan, 2, 10, 12],
            [1, 2, 2, inf, 12],
            [0, -inf, 2, 10, 12],
            [0, 4, 4, 4, 4],
            [1, 12, 10, 2, 2],
            [0, 2, 2, 30, 24],
        ]
    )
    offset = torch.zeros(len(rois), 2, *OUT)
    offset[5, 0, 3, 4] = nan
    expected = module(x, rois, offset)
    # Adaptive sampling takes no samples in an empty or inverted RoI; a fixed grid still samples it.
    zero_rows = [0, 1, 2] + ([3, 4] if sampling_ratio == 0 else [])
    assert expected[zero_rows].abs().max() == 0
    if deform:
        assert expected[5, :, 3, 4].abs().max() == 0 and expected[5].abs().max() > 0
    assert _max_diff(expected, run_ort(session, [x, rois, offset])[0]) <= ATOL
    assert _max_diff(expected, run_reference(model, [x, rois, offset])[0]) <= ATOL
