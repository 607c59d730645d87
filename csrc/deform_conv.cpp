// The device-independent half of the modulated deformable convolution (see deform_conv.h): argument
// checks, the column budget, and the chunked GEMM driver that both backends run their kernels under.
#include "deform_conv.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "arg_checks.h"

namespace mmdet_dcnv2 {

ConvGeometry check_deform_conv_args(const at::Tensor& input, const at::Tensor& offset,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    int64_t deform_groups) {
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be 4-D (N, C, H, W), got shape ", shape_str(input.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), "input must be a floating-point tensor, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be 4-D (C_out, C_in / groups, kh, kw), got shape ",
                    shape_str(weight.sizes()));
  check_same_kind(weight, "weight", input);
  check_same_kind(offset, "offset", input);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, "groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(deform_groups >= 1, "deform_groups must be >= 1, got ", deform_groups);

  ConvGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.groups = groups;
  g.deform_groups = deform_groups;
  g.sampling = ConvSampling{stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};

  TORCH_CHECK_VALUE(g.kernel_h >= 1 && g.kernel_w >= 1, "weight must have a kernel of at least 1x1, got shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(g.in_channels % groups == 0, "input channels (", g.in_channels, ") must be divisible by groups (",
                    groups, ")");
  TORCH_CHECK_VALUE(g.out_channels % groups == 0, "weight's output channels (", g.out_channels,
                    ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.in_channels % deform_groups == 0, "input channels (", g.in_channels,
                    ") must be divisible by deform_groups (", deform_groups, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.in_channels,
                    "weight must have C_in / groups = ", g.in_channels / groups, " input channels (input has ",
                    g.in_channels, ", groups=", groups, "), got weight of shape ", shape_str(weight.sizes()));

  const int64_t span_h = g.sampling.dil_h * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.sampling.dil_w * (g.kernel_w - 1) + 1;
  g.out_h = (g.height + 2 * g.sampling.pad_h - span_h) / g.sampling.stride_h + 1;
  g.out_w = (g.width + 2 * g.sampling.pad_w - span_w) / g.sampling.stride_w + 1;
  TORCH_CHECK_VALUE(g.height + 2 * g.sampling.pad_h >= span_h && g.width + 2 * g.sampling.pad_w >= span_w,
                    "input is too small: padded size (", g.height + 2 * g.sampling.pad_h, ", ",
                    g.width + 2 * g.sampling.pad_w, ") is smaller than the dilated kernel (", span_h, ", ", span_w,
                    ")");

  const int64_t taps = g.taps();
  const std::vector<int64_t> offset_shape{g.batch, 2 * deform_groups * taps, g.out_h, g.out_w};
  TORCH_CHECK_VALUE(offset.sizes() == at::IntArrayRef(offset_shape), "offset must have shape ", shape_str(offset_shape),
                    " (N, 2 * deform_groups * kh * kw, H_out, W_out), got ", shape_str(offset.sizes()));
  if (mask.has_value()) {
    check_same_kind(*mask, "mask", input);
    const std::vector<int64_t> mask_shape{g.batch, deform_groups * taps, g.out_h, g.out_w};
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef(mask_shape), "mask must have shape ", shape_str(mask_shape),
                      " (N, deform_groups * kh * kw, H_out, W_out), got ", shape_str(mask->sizes()));
  }
  if (bias.has_value()) {
    check_same_kind(*bias, "bias", input);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.out_channels, "bias must have shape [", g.out_channels,
                      "], got ", shape_str(bias->sizes()));
  }
  return g;
}

void check_deform_conv_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const ConvGeometry& g) {
  check_same_kind(grad_output, "grad_output", input);
  const std::vector<int64_t> shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(shape), "grad_output must have shape ", shape_str(shape),
                    ", got ", shape_str(grad_output.sizes()));
}

ConvOperands deform_conv_operands(const at::Tensor& input, const at::Tensor& offset,
                                  const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  int64_t deform_groups) {
  const ConvGeometry g =
      check_deform_conv_args(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  return {g,
          input.contiguous(),
          offset.contiguous(),
          mask.has_value() ? mask->contiguous() : at::Tensor(),
          weight.contiguous(),
          bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt};
}

namespace {
// 256 MiB of columns: c3 of an 800x1216 R-50 needs 70 MB per float32 image, so typical batches run
// in one chunk while a large batch of large images cannot exhaust memory.
std::atomic<int64_t> g_column_budget{int64_t(256) << 20};
}  // namespace

int64_t column_budget_bytes(int64_t new_value) {
  if (new_value < 0) return g_column_budget.load();
  return g_column_budget.exchange(new_value);
}

std::vector<ColumnTile> column_tiles(const ConvGeometry& g, int64_t element_size, int64_t max_bytes) {
  const int64_t pixels = g.pixels();
  const int64_t column_bytes = std::max<int64_t>(1, g.in_channels * g.taps() * element_size);
  const int64_t max_cols = std::max<int64_t>(1, std::min(max_bytes, column_budget_bytes()) / column_bytes);
  std::vector<ColumnTile> tiles;
  if (max_cols >= pixels) {
    const int64_t images = std::max<int64_t>(1, max_cols / std::max<int64_t>(1, pixels));
    for (int64_t n0 = 0; n0 < g.batch; n0 += images) tiles.push_back({n0, std::min(images, g.batch - n0), 0, pixels});
  } else {
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t p0 = 0; p0 < pixels; p0 += max_cols) tiles.push_back({n, 1, p0, std::min(pixels, p0 + max_cols)});
    }
  }
  return tiles;
}

}  // namespace mmdet_dcnv2

namespace mmdet_dcnv2 {

namespace {

// The (C, tile.cols()) matrix of a tile of a contiguous (N, C, H, W) tensor: a strided view within
// one image, a transposed copy across several.
at::Tensor tile_matrix(const at::Tensor& t, const ColumnTile& tile) {
  const int64_t channels = t.size(1), pixels = t.size(2) * t.size(3);
  if (tile.count == 1) return t[tile.n0].view({channels, pixels}).narrow(1, tile.p0, tile.width());
  return t.narrow(0, tile.n0, tile.count)
      .view({tile.count, channels, pixels})
      .transpose(0, 1)
      .reshape({channels, tile.cols()});
}

// A contiguous (rows, cols) matrix at the start of a flat buffer (a narrowed 2-D buffer would not be
// contiguous, and the kernels index columns densely).
at::Tensor matrix_in(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

at::Tensor group_rows(const at::Tensor& t, int64_t grp, int64_t rows) { return t.narrow(0, grp * rows, rows); }

// The column buffer of a tile in the backend's layout, seen per conv group as the (C_in/groups *
// taps, cols) matrix the GEMMs take: rows of the channel-major matrix, or a transposed block of
// columns of the pixel-major one (BLAS reads and writes that as a column-major operand, no copy).
struct ColumnMatrix {
  at::Tensor flat;  // contiguous, in the layout
  ColumnLayout layout;
  int64_t groups;

  static ColumnMatrix in(const at::Tensor& buffer, int64_t rows, int64_t cols, ColumnLayout layout, int64_t groups) {
    return {layout == ColumnLayout::kChannelMajor ? matrix_in(buffer, rows, cols) : matrix_in(buffer, cols, rows),
            layout, groups};
  }
  at::Tensor group(int64_t grp) const {
    if (layout == ColumnLayout::kChannelMajor) return group_rows(flat, grp, flat.size(0) / groups);
    const int64_t per_group = flat.size(1) / groups;
    return flat.narrow(1, grp * per_group, per_group).t();
  }
};

// The weight as (C_out, C_in/groups * taps) rows in the order of the columns' rows: (c, k) as stored
// for the channel-major layout, (k, c) for the pixel-major one. (Explicit sizes: C_in may be 0.)
at::Tensor weight_in_column_order(const at::Tensor& weight, const ConvGeometry& g, ColumnLayout layout) {
  if (layout == ColumnLayout::kChannelMajor) return weight.view({g.out_channels, g.in_per_group() * g.taps()});
  return weight.view({g.out_channels, g.in_per_group(), g.taps()})
      .transpose(1, 2)
      .reshape({g.out_channels, g.in_per_group() * g.taps()});
}

// Back from the column order to the weight's (C_out, C_in/groups, kh, kw).
at::Tensor weight_from_column_order(const at::Tensor& rows, const at::Tensor& weight, const ConvGeometry& g,
                                    ColumnLayout layout) {
  if (layout == ColumnLayout::kChannelMajor) return rows.view(weight.sizes());
  return rows.view({g.out_channels, g.taps(), g.in_per_group()}).transpose(1, 2).contiguous().view(weight.sizes());
}

}  // namespace

at::Tensor deform_conv_forward(const ConvOperands& op, ColumnKernels& kernels) {
  const ConvGeometry& g = op.g;
  const at::Tensor &input = op.input, &weight = op.weight;
  const std::optional<at::Tensor>& bias = op.bias;
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0 || g.out_channels == 0) return output;
  if (g.in_channels == 0) {  // an empty sum: the bias alone
    return bias.has_value() ? output.copy_(bias->view({1, -1, 1, 1}).expand_as(output)) : output.zero_();
  }
  const auto tiles = column_tiles(g, input.element_size(), kernels.preferred_tile_bytes());
  const int64_t max_cols = tiles.front().cols(), rows = g.in_channels * g.taps();
  const ColumnLayout layout = kernels.layout();
  const at::Tensor weight_rows = weight_in_column_order(weight, g, layout);
  at::Tensor columns = at::empty({rows * max_cols}, input.options());
  at::Tensor out_buf = tiles.front().count > 1 ? at::empty({g.out_channels * max_cols}, input.options()) : at::Tensor();

  for (const ColumnTile& tile : tiles) {
    const ColumnMatrix cols = ColumnMatrix::in(columns, rows, tile.cols(), layout, g.groups);
    kernels.begin_tile(tile);
    kernels.fill_columns(cols.flat);
    // Within one image the GEMM writes straight into the output; across images it goes through a
    // buffer and a transpose.
    at::Tensor out = tile.count == 1 ? tile_matrix(output, tile) : matrix_in(out_buf, g.out_channels, tile.cols());
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      at::Tensor out_g = group_rows(out, grp, g.out_per_group());
      at::Tensor weight_g = group_rows(weight_rows, grp, g.out_per_group());
      if (bias.has_value()) {
        at::addmm_out(out_g, group_rows(*bias, grp, g.out_per_group()).unsqueeze(1), weight_g, cols.group(grp));
      } else {
        at::mm_out(out_g, weight_g, cols.group(grp));
      }
    }
    if (tile.count > 1) {
      output.narrow(0, tile.n0, tile.count)
          .copy_(out.view({g.out_channels, tile.count, g.out_h, g.out_w}).transpose(0, 1));
    }
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const ConvOperands& op, const at::Tensor& grad_output, std::array<bool, 3> output_mask, ColumnKernels& kernels) {
  const ConvGeometry& g = op.g;
  const at::Tensor &input = op.input, &weight = op.weight;
  const bool need_input = output_mask[0], need_offset = output_mask[1], need_weight = output_mask[2];
  const auto opts = input.options();
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_dtype);
  auto none = [&] { return at::empty({0}, opts); };

  ConvGrads grads;
  if (need_input) grads.input = at::zeros(input.sizes(), acc_opts);
  if (need_offset) grads.offset = at::zeros(op.offset.sizes(), acc_opts);
  if (need_offset && op.mask.defined()) grads.mask = at::zeros(op.mask.sizes(), acc_opts);
  const ColumnLayout layout = kernels.layout();
  const at::Tensor weight_rows = weight_in_column_order(weight, g, layout);
  // Accumulated in the columns' row order, turned back into the weight's layout at the end.
  at::Tensor grad_weight_rows = need_weight ? at::zeros(weight_rows.sizes(), acc_opts) : at::Tensor();

  if (g.batch > 0 && g.out_channels > 0 && g.in_channels > 0 && (need_input || need_offset || need_weight)) {
    const auto tiles = column_tiles(g, input.element_size(), kernels.preferred_tile_bytes());
    const int64_t max_cols = tiles.front().cols(), rows = g.in_channels * g.taps();
    at::Tensor columns = need_weight ? at::empty({rows * max_cols}, opts) : at::Tensor();
    at::Tensor grad_columns = need_input || need_offset ? at::empty({rows * max_cols}, opts) : at::Tensor();
    for (const ColumnTile& tile : tiles) {
      const at::Tensor gout = tile_matrix(grad_output, tile);  // (C_out, tile.cols())
      kernels.begin_tile(tile);
      if (need_weight) {
        const ColumnMatrix cols = ColumnMatrix::in(columns, rows, tile.cols(), layout, g.groups);
        kernels.fill_columns(cols.flat);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          group_rows(grad_weight_rows, grp, g.out_per_group())
              .add_(at::mm(group_rows(gout, grp, g.out_per_group()), cols.group(grp).t()));
        }
      }
      if (need_input || need_offset) {
        const ColumnMatrix gcols = ColumnMatrix::in(grad_columns, rows, tile.cols(), layout, g.groups);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor gcols_g = gcols.group(grp);
          at::mm_out(gcols_g, group_rows(weight_rows, grp, g.out_per_group()).t(),
                     group_rows(gout, grp, g.out_per_group()));
        }
        kernels.backprop_columns(gcols.flat, grads);
      }
    }
    kernels.finish_backward(grads);
  }
  const at::Tensor grad_weight =
      need_weight ? weight_from_column_order(grad_weight_rows, weight, g, layout) : at::Tensor();
  auto finish = [&](const at::Tensor& acc) { return acc.defined() ? acc.to(input.scalar_type()) : none(); };
  at::Tensor grad_bias = need_weight && op.bias.has_value()
                             ? grad_output.sum({0, 2, 3}, /*keepdim=*/false, acc_dtype).to(input.scalar_type())
                             : none();
  return {finish(grads.input), finish(grads.offset), finish(grads.mask), finish(grad_weight), grad_bias};
}

}  // namespace mmdet_dcnv2
