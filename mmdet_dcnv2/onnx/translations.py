"""onnxscript translations of our two custom ops into standard ONNX operators.

torch's dynamo exporter calls these with the op's own arguments (tensors as symbolic values, the
rest as Python values) while an onnxscript tracer records every ``op.X(...)`` into the graph at the
opset the export targets, whatever opset module the function names. We write against opset 20
(the exporter's default); both operators exist unchanged from opset 19 (``DeformConv``) and 16
(``RoiAlign`` with ``coordinate_transformation_mode``).

- ``modulated_deform_conv2d`` -> one ``DeformConv``: the same offset layout ((dy, dx) per kernel
  point, grouped by deformable group), the same zero border; ``mask=None`` (DCNv1) and ``bias=None``
  become absent optional inputs.
- ``deform_roi_pool`` -> ``RoiAlign`` (see :func:`deform_roi_pool`).
"""

from onnxscript import opset20 as op

# RoiAlign's mode and our ops' ``spatial_scale`` convention: x * scale - 0.5 (aligned=True).
_HALF_PIXEL = "half_pixel"


def _static_kernel_shape(weight):
    shape = weight.shape
    dims = [] if shape is None else [shape[2], shape[3]] if len(shape) == 4 else []
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        # DeformConv needs kernel_shape as an attribute; a weight whose size is only known at run
        # time (fed as a graph input of unknown shape) cannot provide it.
        raise ValueError(f"modulated_deform_conv2d export: the weight's kernel size must be static, got shape {shape}")
    return dims


def modulated_deform_conv2d(
    input, offset, mask, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, deform_groups=1
):
    """``torch.ops.mmdet_dcnv2.modulated_deform_conv2d`` as ONNX ``DeformConv``."""
    pad_h, pad_w = padding
    return op.DeformConv(
        input,
        weight,
        offset,
        bias,
        mask,
        dilations=list(dilation),
        group=groups,
        kernel_shape=_static_kernel_shape(weight),
        offset_group=deform_groups,
        pads=[pad_h, pad_w, pad_h, pad_w],
        strides=list(stride),
    )


def _column(table, index):
    """Column ``index`` of a 2-D tensor, as (rows, 1)."""
    return op.Slice(
        table, op.Constant(value_ints=[index]), op.Constant(value_ints=[index + 1]), op.Constant(value_ints=[1])
    )


def _non_finite(x):
    # x - x is 0 for a finite x and NaN for NaN or +-inf.
    return op.IsNaN(op.Sub(x, x))


def _row_non_finite(table):
    """(rows, 1) bool: the row holds a NaN or an infinity (a sum is NaN when any term is)."""
    return op.IsNaN(op.ReduceSum(op.Sub(table, table), op.Constant(value_ints=[1]), keepdims=1))


def _batch_indices(batch_column, bad):
    """RoiAlign's int64 batch indices (truncated as our kernels do), 0 for rows we zero anyway:
    a NaN would reach ORT's integer conversion, which is undefined."""
    safe = op.Where(bad, op.CastLike(0, batch_column), batch_column)
    return op.Reshape(op.Cast(safe, to=7), op.Constant(value_ints=[-1]))  # 7 = INT64


def _zero_where(bad, pooled, rank_shape):
    """pooled with the rows flagged in ``bad`` (rows, 1) set to zero."""
    return op.Where(op.Reshape(bad, op.Constant(value_ints=rank_shape)), op.CastLike(0, pooled), pooled)


def deform_roi_pool(input, rois, offset=None, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1):
    """``torch.ops.mmdet_dcnv2.deform_roi_pool`` as ONNX ``RoiAlign``.

    Without offsets the op is RoIAlign with aligned=True: one ``RoiAlign`` (half_pixel) over the
    rois split into boxes and int64 batch indices.

    With offsets each bin of each RoI is its own sub-RoI -- the bin shifted by its offset -- pooled
    to 1x1: R * out_h * out_w boxes through one ``RoiAlign``. A 1x1 RoiAlign averages a grid of
    samples over its box exactly as the op averages them over the shifted bin. With
    ``sampling_ratio > 0`` the grid is fixed and the result matches up to float rounding of the
    sample positions. With ``sampling_ratio <= 0`` the grid is ``ceil(bin size)`` per side, and
    RoiAlign recomputes the size from the box's corners: x2 - x1 rounds, and when the bin size is
    within rounding of an integer (a 14-px RoI over 7 bins) that can flip the ceiling and change
    the number of samples. The box is built so that RoiAlign's own arithmetic (x * 1.0 - 0.5 on
    each corner, then the difference) gives the op's grid size; where it would not, the far
    corner is moved by a few units in the last place, to just inside the op's integer.

    Non-finite RoIs or offsets pool to zeros in our op; RoiAlign would convert them to indices
    (undefined behaviour), so such rows get a harmless box and are zeroed afterwards. Empty or
    inverted RoIs pool to zeros as in the op.
    """
    out_h, out_w = output_size
    bad_roi = _row_non_finite(rois)  # (R, 1)
    batch = _column(rois, 0)
    if offset is None:
        boxes = op.Slice(rois, op.Constant(value_ints=[1]), op.Constant(value_ints=[5]), op.Constant(value_ints=[1]))
        boxes = op.Where(bad_roi, op.CastLike(0, boxes), boxes)
        pooled = op.RoiAlign(
            input,
            boxes,
            _batch_indices(batch, bad_roi),
            coordinate_transformation_mode=_HALF_PIXEL,
            mode="avg",
            output_height=out_h,
            output_width=out_w,
            sampling_ratio=sampling_ratio,
            spatial_scale=float(spatial_scale),
        )
        return _zero_where(bad_roi, pooled, [-1, 1, 1, 1])
    return _deformed_pool(
        input, rois, offset, bad_roi, batch, out_h, out_w, float(spatial_scale), int(sampling_ratio), float(gamma)
    )


def _axis_boxes(low, high, bins, offset_channel, offset, scale, gamma, sampling_ratio, axis):
    """Corners (R, bins_h, bins_w) of every shifted bin along one axis (x: axis 2, y: axis 1 of the
    bin grid), in the coordinates RoiAlign reads with half_pixel and spatial_scale 1, and a flag for
    bins the op leaves empty. Arithmetic in the op's order (csrc/dcn_common.h: roi_bin)."""
    half = op.CastLike(0.5, low)
    start = op.Sub(op.Mul(low, op.CastLike(scale, low)), half)  # (R, 1)
    size = op.Sub(op.Sub(op.Mul(high, op.CastLike(scale, low)), half), start)
    bin_size = op.Div(size, op.CastLike(float(bins), low))
    start = op.Reshape(start, op.Constant(value_ints=[-1, 1, 1]))
    size = op.Reshape(size, op.Constant(value_ints=[-1, 1, 1]))
    bin_size = op.Reshape(bin_size, op.Constant(value_ints=[-1, 1, 1]))
    shift = op.Squeeze(
        op.Slice(
            offset,
            op.Constant(value_ints=[offset_channel]),
            op.Constant(value_ints=[offset_channel + 1]),
            op.Constant(value_ints=[1]),
        ),
        op.Constant(value_ints=[1]),
    )  # (R, out_h, out_w)
    index_shape = [1, bins, 1] if axis == 1 else [1, 1, bins]
    index = op.Reshape(op.CastLike(op.Range(0, bins, 1), low), op.Constant(value_ints=index_shape))
    edge = op.Add(op.Add(start, op.Mul(op.Mul(op.CastLike(gamma, low), size), shift)), op.Mul(index, bin_size))
    first = op.Add(edge, half)  # RoiAlign subtracts 0.5 again (half_pixel)
    last = op.Add(first, bin_size)
    if sampling_ratio <= 0:
        last = _keep_grid_size(first, last, bin_size, half)
        # The op takes no samples where ceil(bin size) is not positive (NaN compares false too);
        # an infinite size makes the corners non-finite, flagged below.
        empty = op.Not(op.Greater(op.Ceil(bin_size), op.CastLike(0, low)))
    else:
        # A fixed grid samples an inverted RoI too, as the op does: only a NaN size is empty.
        empty = op.IsNaN(bin_size)
    empty = op.Expand(empty, op.Shape(first))
    return first, last, op.Or(empty, op.Or(_non_finite(first), _non_finite(last)))


def _keep_grid_size(first, last, bin_size, half):
    """``last`` moved, where needed, so that RoiAlign's ceil((last - .5) - (first - .5)) equals the
    op's ceil(bin_size)."""
    width = op.Sub(op.Sub(last, half), op.Sub(first, half))
    wanted = op.Ceil(bin_size)
    one = op.CastLike(1, first)
    # Three units in the last place of the largest corner (float32: 2^-23 relative, plus 2^-23 for
    # corners below 1): more than the rounding of the four operations behind RoiAlign's width
    # (first + target, the two corner shifts and their difference, half a unit each), and small
    # enough that the samples move by ~1e-6 px on a 100-px map.
    ulps = op.Mul(op.Add(op.Max(op.Abs(first), op.Abs(last)), one), op.CastLike(3.0 * 2.0**-23, first))
    target = op.Min(op.Max(width, op.Add(op.Sub(wanted, one), ulps)), op.Sub(wanted, ulps))
    return op.Where(op.Equal(op.Ceil(width), wanted), last, op.Add(first, target))


def _deformed_pool(input, rois, offset, bad_roi, batch, out_h, out_w, scale, sampling_ratio, gamma):
    x_first, x_last, x_bad = _axis_boxes(
        _column(rois, 1), _column(rois, 3), out_w, 0, offset, scale, gamma, sampling_ratio, axis=2
    )
    y_first, y_last, y_bad = _axis_boxes(
        _column(rois, 2), _column(rois, 4), out_h, 1, offset, scale, gamma, sampling_ratio, axis=1
    )
    bins = out_h * out_w
    bad = op.Or(op.Or(x_bad, y_bad), op.Reshape(bad_roi, op.Constant(value_ints=[-1, 1, 1])))
    bad = op.Reshape(bad, op.Constant(value_ints=[-1, 1]))  # (R * bins, 1)
    corners = [op.Reshape(c, op.Constant(value_ints=[-1, 1])) for c in (x_first, y_first, x_last, y_last)]
    boxes = op.Concat(*corners, axis=1)
    boxes = op.Where(bad, op.CastLike(0, boxes), boxes)
    batch = op.Reshape(op.Expand(batch, op.Constant(value_ints=[1, bins])), op.Constant(value_ints=[-1, 1]))
    pooled = op.RoiAlign(
        input,
        boxes,
        _batch_indices(batch, bad),
        coordinate_transformation_mode=_HALF_PIXEL,
        mode="avg",
        output_height=1,
        output_width=1,
        sampling_ratio=sampling_ratio,
        spatial_scale=1.0,
    )  # (R * bins, C, 1, 1)
    pooled = _zero_where(bad, pooled, [-1, 1, 1, 1])
    channels = op.Slice(op.Shape(input), op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    pooled = op.Reshape(pooled, op.Concat(op.Constant(value_ints=[-1, out_h, out_w]), channels, axis=0))
    return op.Transpose(pooled, perm=[0, 3, 1, 2])
