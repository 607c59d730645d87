// The device-independent half of the modulated deformable convolution (see deform_conv.h): argument
// checks, the column budget, and the chunked GEMM driver that both backends run their kernels under.
#include "deform_conv.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "arg_checks.h"
#include "cpu/cpu_isa.h"
#include "cpu/transpose.h"

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

// Whether MKL_ENABLE_INSTRUCTIONS holds MKL below the vector width this CPU has (MKL reads it once,
// at its first call; so do we, as the rule must not change within a process).
bool mkl_capped_below_cpu() {
  static const bool capped = [] {
    const char* env = std::getenv("MKL_ENABLE_INSTRUCTIONS");
    if (env == nullptr || *env == '\0') return false;
    const std::string v = env;
    const bool allows_avx512 = v.rfind("AVX512", 0) == 0 || v.rfind("AVX10", 0) == 0;
    const bool allows_avx2 = allows_avx512 || v.rfind("AVX2", 0) == 0;
    switch (cpu_isa_supported()) {
      case CpuIsa::kAvx512:
        return !allows_avx512;
      case CpuIsa::kAvx2:
        return !allows_avx2;
      default:
        return false;
    }
  }();
  return capped;
}

// MMDET_DCNV2_CPU_GEMM, checked: auto (or unset), brgemm, mm or onednn.
std::string cpu_gemm_choice() {
  const char* env = std::getenv("MMDET_DCNV2_CPU_GEMM");
  const std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK_VALUE(choice == "auto" || choice == "brgemm" || choice == "mm" || choice == "onednn",
                    "MMDET_DCNV2_CPU_GEMM must be auto, brgemm, mm or onednn, got '", choice, "'");
  return choice;
}

// torch built with oneDNN and the user not having switched it off (torch.backends.mkldnn.enabled).
bool onednn_enabled() { return AT_MKLDNN_ENABLED() && at::globalContext().userEnabledMkldnn(); }

// Whether oneDNN's JIT may use AVX2: ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) can cap
// it below, and then ATen's brgemm runs its BLAS fallback instead of the microkernel.
bool onednn_allows_avx2() {
  for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
    const char* env = std::getenv(name);
    if (env == nullptr || *env == '\0') continue;
    std::string v = env;
    for (char& ch : v) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    if (v == "SSE41" || v == "AVX") return false;
  }
  return true;
}

}  // namespace

bool cpu_fused_forward(at::ScalarType dtype) {
  const std::string choice = cpu_gemm_choice();
  // The microkernel is oneDNN's, through ATen's cpublas::brgemm: float32, oneDNN enabled, and a CPU
  // (and cap) that gives its JIT AVX2 at least -- elsewhere ATen would fall back to one BLAS call per
  // block. mm and onednn ask for the tiled forward on that route.
  return dtype == at::kFloat && (choice == "auto" || choice == "brgemm") && onednn_enabled() &&
         cpu_isa_supported() != CpuIsa::kBaseline && onednn_allows_avx2();
}

CpuGemm cpu_gemm_route(at::ScalarType dtype, ColumnLayout layout) {
  const std::string choice = cpu_gemm_choice();
  // Where oneDNN can run the GEMMs at all: torch built with it and not switched off
  // (torch.backends.mkldnn.enabled), pixel-major columns, and a dtype it computes in full: float32,
  // and bfloat16 where the CPU has the AVX-512 subsets ATen's oneDNN bfloat16 path requires.
  // float64 and float16 stay on at::mm.
  bool possible = onednn_enabled() && layout == ColumnLayout::kPixelMajor &&
                  (dtype == at::kFloat || (dtype == at::kBFloat16 && cpu_isa_supported() == CpuIsa::kAvx512));
  if (!possible || choice == "mm") return CpuGemm::kMm;
  if (choice == "onednn") return CpuGemm::kOneDnn;
  // bfloat16: at::mm itself runs on oneDNN's matmul, which takes the transposed operands without the
  // copies and weight reorders of the 1x1 convolutions.
  if (dtype == at::kBFloat16) return CpuGemm::kMm;
  // float32: at::mm is MKL's sgemm, which runs full-width kernels only on Intel CPUs and only where
  // MKL_ENABLE_INSTRUCTIONS does not cap it below what the CPU has. There it matches oneDNN without
  // the route's transposes; elsewhere (AMD: an AVX2 path even on AVX-512 parts) oneDNN is faster.
  return cpu_is_intel() && !mkl_capped_below_cpu() ? CpuGemm::kMm : CpuGemm::kOneDnn;
}

const char* cpu_gemm_name(CpuGemm route) { return route == CpuGemm::kOneDnn ? "onednn" : "mm"; }

namespace {

std::string cpu_gemm_route_op(at::ScalarType dtype) {
  // The CPU backend's layout (the only one the oneDNN route applies to).
  const char* tiled = cpu_gemm_name(cpu_gemm_route(dtype, ColumnLayout::kPixelMajor));
  return std::string("forward ") + (cpu_fused_forward(dtype) ? "brgemm" : tiled) + ", backward " + tiled;
}

}  // namespace

// Introspection for benchmarks and tests: the GEMM route a CPU call of that dtype takes now.
TORCH_LIBRARY_FRAGMENT(mmdet_dcnv2, m) { m.def("_cpu_gemm_route(ScalarType dtype) -> str", &cpu_gemm_route_op); }

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

}  // namespace

// On the CPU by blocked transposes (ATen's copy of a transposed view costs ~5 ms for c5's weight, a
// sixth of the dense convolution).
at::Tensor swap_inner_dims(const at::Tensor& t, int64_t b, int64_t r, int64_t c) {
  const at::Tensor src = t.contiguous().view({b, r, c});
  if (!src.is_cpu()) return src.transpose(1, 2).contiguous();
  at::Tensor out = at::empty({b, c, r}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "swap_inner_dims", [&] {
    // out[bi][j][i] = src[bi][i][j]: rows i of src (stride c) become columns of out (stride r).
    transpose_batched<false>(src.const_data_ptr<scalar_t>(), c, out.data_ptr<scalar_t>(), r, r, c, {b, r * c, r * c});
  });
  return out;
}

at::Tensor weight_in_column_order(const at::Tensor& weight, const ConvGeometry& g, ColumnLayout layout) {
  if (layout == ColumnLayout::kChannelMajor) return weight.view({g.out_channels, g.in_per_group() * g.taps()});
  return swap_inner_dims(weight, g.out_channels, g.in_per_group(), g.taps())
      .view({g.out_channels, g.in_per_group() * g.taps()});
}

namespace {

// ---- the oneDNN route (CpuGemm::kOneDnn) ----
// A pixel-major (cols, K) matrix is a channels-last (1, K, 1, cols) image, and the weight in column
// order (C_out, K / groups) a channels-last 1x1 kernel: oneDNN takes both as they are (the explicit
// strides matter: for a 1x1 kernel torch would otherwise call the contiguous weight NCHW and reorder
// the columns). A conv group's columns are a contiguous block of K / groups, as grouped conv wants.
at::Tensor as_nhwc_image(const at::Tensor& m) {
  const int64_t cols = m.size(0), k = m.size(1);
  return m.as_strided({1, k, 1, cols}, {cols * k, 1, cols * k, k});
}

at::Tensor as_1x1_kernel(const at::Tensor& rows) {
  const int64_t k = rows.size(1);
  return rows.as_strided({rows.size(0), k, 1, 1}, {k, 1, k, k});
}

// Between a tile's block of a contiguous (N, C, H, W) tensor and a contiguous pixel-major
// (tile.cols(), C) matrix, with the blocked transposes of cpu/transpose.h (ATen's copy_ of a
// transposed view costs several times more).
void planar_to_pixel_major(const at::Tensor& t, const ColumnTile& tile, const at::Tensor& m) {
  const int64_t c = t.size(1), pixels = t.size(2) * t.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "planar_to_pixel_major", [&] {
    transpose_batched<false>(t.const_data_ptr<scalar_t>() + tile.n0 * c * pixels + tile.p0, pixels,
                             m.data_ptr<scalar_t>(), c, c, tile.width(), {tile.count, c * pixels, tile.width() * c});
  });
}

void pixel_major_to_planar(const at::Tensor& m, const ColumnTile& tile, const at::Tensor& t) {
  const int64_t c = t.size(1), pixels = t.size(2) * t.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "pixel_major_to_planar", [&] {
    transpose_batched<false>(m.const_data_ptr<scalar_t>(), c, t.data_ptr<scalar_t>() + tile.n0 * c * pixels + tile.p0,
                             pixels, tile.width(), c, {tile.count, tile.width() * c, c * pixels});
  });
}

// ATen picks the convolution backend by a heuristic that sends a single-threaded 1x1 convolution of
// one image to its im2col + BLAS fallback (Slow2d) -- the MKL path this route exists to avoid. A 1x1
// kernel samples the same pixels at any dilation, and a dilated convolution always goes to oneDNN,
// so the backward asks for dilation 2: same arithmetic, oneDNN's kernels, a fixed choice.
constexpr int64_t kOneDnnBackwardDilation = 2;

// Columns per tile on the oneDNN route: each call reorders the weight into oneDNN's blocked layout,
// which a wider tile amortises, but its backward slows down past ~2000 columns (measured at c3, one
// thread: grad of weight 34 ms at 1820 columns, 52 ms at 5461; grad of columns 28 ms vs 57 ms for
// the whole 15200), so tiles stay near 8 MiB.
constexpr int64_t kOneDnnTileBytes = int64_t(8) << 20;

// Back from the column order to the weight's (C_out, C_in/groups, kh, kw).
at::Tensor weight_from_column_order(const at::Tensor& rows, const at::Tensor& weight, const ConvGeometry& g,
                                    ColumnLayout layout) {
  if (layout == ColumnLayout::kChannelMajor) return rows.view(weight.sizes());
  return swap_inner_dims(rows, g.out_channels, g.taps(), g.in_per_group()).view(weight.sizes());
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
  const ColumnLayout layout = kernels.layout();
  const bool onednn = input.is_cpu() && cpu_gemm_route(input.scalar_type(), layout) == CpuGemm::kOneDnn;
  const int64_t tile_bytes =
      onednn ? std::max(kernels.preferred_tile_bytes(), kOneDnnTileBytes) : kernels.preferred_tile_bytes();
  const auto tiles = column_tiles(g, input.element_size(), tile_bytes);
  const int64_t max_cols = tiles.front().cols(), rows = g.in_channels * g.taps();
  const at::Tensor weight_rows = weight_in_column_order(weight, g, layout);
  at::Tensor columns = at::empty({rows * max_cols}, input.options());
  at::Tensor out_buf =
      !onednn && tiles.front().count > 1 ? at::empty({g.out_channels * max_cols}, input.options()) : at::Tensor();

  for (const ColumnTile& tile : tiles) {
    const ColumnMatrix cols = ColumnMatrix::in(columns, rows, tile.cols(), layout, g.groups);
    kernels.begin_tile(tile);
    kernels.fill_columns(cols.flat);
    if (onednn) {
      // (1, C_out, 1, cols) channels-last: pixel-major rows of the output, transposed into place.
      const at::Tensor out = at::mkldnn_convolution(as_nhwc_image(cols.flat), as_1x1_kernel(weight_rows), bias, {0, 0},
                                                    {1, 1}, {1, 1}, g.groups);
      pixel_major_to_planar(out.permute({0, 2, 3, 1}).contiguous(), tile, output);
      continue;
    }
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
    const bool onednn = input.is_cpu() && cpu_gemm_route(input.scalar_type(), layout) == CpuGemm::kOneDnn;
    const int64_t tile_bytes =
        onednn ? std::max(kernels.preferred_tile_bytes(), kOneDnnTileBytes) : kernels.preferred_tile_bytes();
    const auto tiles = column_tiles(g, input.element_size(), tile_bytes);
    const int64_t max_cols = tiles.front().cols(), rows = g.in_channels * g.taps();
    const bool need_columns = need_input || need_offset;
    // The oneDNN route gets grad of columns from ATen (no out= variant), but needs a column-shaped
    // input even when only the grad of columns is asked for (oneDNN reads only its shape then).
    at::Tensor columns = need_weight || (onednn && need_columns) ? at::empty({rows * max_cols}, opts) : at::Tensor();
    at::Tensor grad_columns = need_columns && !onednn ? at::empty({rows * max_cols}, opts) : at::Tensor();
    at::Tensor gout_buf = onednn ? at::empty({g.out_channels * max_cols}, opts) : at::Tensor();
    const at::Tensor kernel = onednn ? as_1x1_kernel(weight_rows) : at::Tensor();

    auto onednn_tile = [&](const ColumnTile& tile) {
      const ColumnMatrix cols = ColumnMatrix::in(columns, rows, tile.cols(), layout, g.groups);
      if (need_weight) kernels.fill_columns(cols.flat);
      // grad_output's pixels of the tile, pixel-major: the channels-last grad of the 1x1 output.
      const at::Tensor gout = matrix_in(gout_buf, tile.cols(), g.out_channels);
      planar_to_pixel_major(grad_output, tile, gout);
      const int64_t dil = kOneDnnBackwardDilation;
      const auto grads_1x1 =
          at::convolution_backward(as_nhwc_image(gout), as_nhwc_image(cols.flat), kernel, std::nullopt, {1, 1}, {0, 0},
                                   {dil, dil}, false, {0, 0}, g.groups, {need_columns, need_weight, false});
      if (need_weight) grad_weight_rows.add_(std::get<1>(grads_1x1).view(grad_weight_rows.sizes()));
      if (need_columns) {
        // (1, K, 1, cols) channels-last: the pixel-major (cols, K) grad of columns, as a view.
        kernels.backprop_columns(std::get<0>(grads_1x1).permute({0, 2, 3, 1}).reshape({tile.cols(), rows}), grads);
      }
    };

    auto mm_tile = [&](const ColumnTile& tile) {
      const at::Tensor gout = tile_matrix(grad_output, tile);  // (C_out, tile.cols())
      if (need_weight) {
        const ColumnMatrix cols = ColumnMatrix::in(columns, rows, tile.cols(), layout, g.groups);
        kernels.fill_columns(cols.flat);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor acc = group_rows(grad_weight_rows, grp, g.out_per_group());
          const at::Tensor a = group_rows(gout, grp, g.out_per_group()), b = cols.group(grp).t();
          // In place (beta = 1) where the accumulator has the operands' dtype: no product temporary.
          if (acc.scalar_type() == a.scalar_type()) {
            acc.addmm_(a, b);
          } else {
            acc.add_(at::mm(a, b));
          }
        }
      }
      if (need_columns) {
        const ColumnMatrix gcols = ColumnMatrix::in(grad_columns, rows, tile.cols(), layout, g.groups);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor gcols_g = gcols.group(grp);
          at::mm_out(gcols_g, group_rows(weight_rows, grp, g.out_per_group()).t(),
                     group_rows(gout, grp, g.out_per_group()));
        }
        kernels.backprop_columns(gcols.flat, grads);
      }
    };

    for (const ColumnTile& tile : tiles) {
      kernels.begin_tile(tile);
      if (onednn) {
        onednn_tile(tile);
      } else {
        mm_tile(tile);
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
