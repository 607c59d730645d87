// Element functions of the CPU (.cpp) and CUDA (.cu) kernels: bilinear sampling in the two border
// conventions DCNv2 needs, and their gradients. Both backends share the in-range test, the bilinear
// weights and coordinate gradients, the base sampling positions and the RoI bins; the RoI pooling
// also shares its corner gather/scatter. The CPU convolution has its own padded channels-last
// sampling (zero_border_padded), the CUDA one uses zero_border_corners and corners_*: those run in
// the tests through the host-run build of the CUDA kernels (docs/cuda.md), not through the CPU op.
//
// Only <cmath>/<cstdint>: no ATen, so the header compiles for host and device alike.
// Template parameters: acc_t is the accumulation type (float for half/bfloat16/float, double for
// double), scalar_t the storage type of the tensors, index_t the type of flat offsets.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCN_HOST_DEVICE inline
#endif

namespace mmdet_dcnv2 {

DCN_HOST_DEVICE float dcn_floor(float x) { return floorf(x); }
DCN_HOST_DEVICE double dcn_floor(double x) { return floor(x); }
DCN_HOST_DEVICE float dcn_ceil(float x) { return ceilf(x); }
DCN_HOST_DEVICE double dcn_ceil(double x) { return ceil(x); }

// The four neighbours of a sampling point inside one channel plane, in the order
// (low y, low x), (low y, high x), (high y, low x), (high y, high x).
// A corner whose value reads as zero (outside the map) has idx < 0 and weight 0, so callers never
// touch memory for it. dy/dx_live say whether moving the point along that axis changes the sample
// (false where a border convention clamps the coordinate): the derivative is zero there.
template <typename acc_t, typename index_t>
struct Corners {
  index_t idx[4];
  acc_t w[4];
  acc_t ly, lx;  // fractional position between the low and high corners
  bool dy_live, dx_live;
};

template <typename acc_t, typename index_t>
DCN_HOST_DEVICE Corners<acc_t, index_t> no_corners() {
  Corners<acc_t, index_t> c;
  for (int j = 0; j < 4; ++j) {
    c.idx[j] = -1;
    c.w[j] = acc_t(0);
  }
  c.ly = c.lx = acc_t(0);
  c.dy_live = c.dx_live = false;
  return c;
}

// Bilinear weights of the four corners for fractional position (ly, lx).
template <typename acc_t>
DCN_HOST_DEVICE void bilinear_weights(acc_t ly, acc_t lx, acc_t w[4]) {
  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  w[0] = hy * hx;
  w[1] = hy * lx;
  w[2] = ly * hx;
  w[3] = ly * lx;
}

// d(value)/dy and d(value)/dx of a bilinear interpolation of corner values v at (ly, lx).
template <typename acc_t>
DCN_HOST_DEVICE void bilinear_coord_grad(const acc_t v[4], acc_t ly, acc_t lx, acc_t& d_y, acc_t& d_x) {
  d_y = (acc_t(1) - lx) * (v[2] - v[0]) + lx * (v[3] - v[1]);
  d_x = (acc_t(1) - ly) * (v[1] - v[0]) + ly * (v[3] - v[2]);
}

template <typename acc_t, typename index_t>
DCN_HOST_DEVICE void fill_corners(Corners<acc_t, index_t>& c, index_t y0, index_t x0, index_t y1, index_t x1,
                                  bool in_y0, bool in_x0, bool in_y1, bool in_x1, index_t width) {
  const bool in[4] = {in_y0 && in_x0, in_y0 && in_x1, in_y1 && in_x0, in_y1 && in_x1};
  const index_t idx[4] = {y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1};
  acc_t w[4];
  bilinear_weights(c.ly, c.lx, w);
  for (int j = 0; j < 4; ++j) {
    c.idx[j] = in[j] ? idx[j] : index_t(-1);
    c.w[j] = in[j] ? w[j] : acc_t(0);
  }
}

// Deformable-convolution convention (mmcv, torchvision): the map is surrounded by zeros. A point
// with -1 < y < height and -1 < x < width interpolates its in-map corners; anything else, NaN and
// infinities included, samples zero. The test is written so that NaN fails it, and floor() is only
// converted to an integer for coordinates already known to be in range.
template <typename acc_t, typename index_t>
DCN_HOST_DEVICE bool zero_border_in_range(acc_t y, acc_t x, index_t height, index_t width) {
  return y > acc_t(-1) && x > acc_t(-1) && y < acc_t(height) && x < acc_t(width);
}

template <typename acc_t, typename index_t>
DCN_HOST_DEVICE Corners<acc_t, index_t> zero_border_corners(acc_t y, acc_t x, index_t height, index_t width) {
  if (!zero_border_in_range(y, x, height, width)) return no_corners<acc_t, index_t>();
  Corners<acc_t, index_t> c;
  const acc_t fy = dcn_floor(y), fx = dcn_floor(x);
  const index_t y0 = static_cast<index_t>(fy), x0 = static_cast<index_t>(fx);
  c.ly = y - fy;
  c.lx = x - fx;
  c.dy_live = c.dx_live = true;
  fill_corners(c, y0, x0, y0 + 1, x0 + 1, y0 >= 0, x0 >= 0, y0 + 1 < height, x0 + 1 < width, width);
  return c;
}

// The same convention against a copy of each plane padded with zeros: two rows on top, one below,
// one column each side (kPadTop/kPadLeft; padded width = width + 2, height = height + 3). Every corner
// of an in-range point then lies inside the padded plane, so reads and scatters need no bounds
// checks, and out-of-map corners read the padding's zeros. An out-of-range point gets offset 0 and
// zero weights: its four corners are all padding, so its value and its coordinate gradient are 0.
// Returns the padded offset of the (low y, low x) corner; the others are +1, +padded width, +both.
constexpr int kPadTop = 2, kPadLeft = 1;

template <typename acc_t, typename index_t>
DCN_HOST_DEVICE index_t zero_border_padded(acc_t y, acc_t x, index_t height, index_t width, acc_t w[4]) {
  if (!zero_border_in_range(y, x, height, width)) {
    w[0] = w[1] = w[2] = w[3] = acc_t(0);
    return 0;
  }
  const acc_t fy = dcn_floor(y), fx = dcn_floor(x);
  bilinear_weights(y - fy, x - fx, w);
  return (static_cast<index_t>(fy) + kPadTop) * (width + 2) + static_cast<index_t>(fx) + kPadLeft;
}

// RoIAlign convention (mmcv's roi_align / deform_roi_pool): a point more than one pixel outside the
// map samples zero; within that band the coordinate is clamped to the map, so the value there does
// not depend on the coordinate (its derivative is zero).
template <typename acc_t, typename index_t>
DCN_HOST_DEVICE Corners<acc_t, index_t> clamped_corners(acc_t y, acc_t x, index_t height, index_t width) {
  if (height <= 0 || width <= 0 || !(y >= acc_t(-1) && x >= acc_t(-1) && y <= acc_t(height) && x <= acc_t(width))) {
    return no_corners<acc_t, index_t>();
  }
  Corners<acc_t, index_t> c;
  c.dy_live = y > acc_t(0);
  c.dx_live = x > acc_t(0);
  if (!c.dy_live) y = acc_t(0);
  if (!c.dx_live) x = acc_t(0);
  index_t y0 = static_cast<index_t>(y), x0 = static_cast<index_t>(x), y1, x1;
  if (y0 >= height - 1) {
    y0 = y1 = height - 1;
    y = acc_t(y0);
    c.dy_live = false;
  } else {
    y1 = y0 + 1;
  }
  if (x0 >= width - 1) {
    x0 = x1 = width - 1;
    x = acc_t(x0);
    c.dx_live = false;
  } else {
    x1 = x0 + 1;
  }
  c.ly = y - acc_t(y0);
  c.lx = x - acc_t(x0);
  fill_corners(c, y0, x0, y1, x1, true, true, true, true, width);
  return c;
}

// The interpolated value of one channel plane.
template <typename acc_t, typename scalar_t, typename index_t>
DCN_HOST_DEVICE acc_t corners_gather(const scalar_t* plane, const Corners<acc_t, index_t>& c) {
  acc_t v = acc_t(0);
  for (int j = 0; j < 4; ++j) {
    if (c.idx[j] >= 0) v += c.w[j] * static_cast<acc_t>(plane[c.idx[j]]);
  }
  return v;
}

// The interpolated value and its derivatives with respect to the sampling point's y and x.
template <typename acc_t, typename scalar_t, typename index_t>
DCN_HOST_DEVICE void corners_gather_with_grad(const scalar_t* plane, const Corners<acc_t, index_t>& c, acc_t& value,
                                              acc_t& d_y, acc_t& d_x) {
  acc_t v[4];
  value = acc_t(0);
  for (int j = 0; j < 4; ++j) {
    v[j] = c.idx[j] >= 0 ? static_cast<acc_t>(plane[c.idx[j]]) : acc_t(0);
    value += c.w[j] * v[j];
  }
  bilinear_coord_grad(v, c.ly, c.lx, d_y, d_x);
  if (!c.dy_live) d_y = acc_t(0);
  if (!c.dx_live) d_x = acc_t(0);
}

// Adds grad * weight into each in-map corner of a gradient plane. `add(ptr, value)` is a plain +=
// on the CPU (each thread owns the planes it writes) and an atomic add on CUDA.
template <typename acc_t, typename out_t, typename index_t, typename Add>
DCN_HOST_DEVICE void corners_scatter(out_t* plane, const Corners<acc_t, index_t>& c, acc_t grad, Add add) {
  for (int j = 0; j < 4; ++j) {
    if (c.idx[j] >= 0) add(plane + c.idx[j], grad * c.w[j]);
  }
}

// ---- modulated deformable convolution ----

// Where kernel point (ki, kj) of output pixel (oy, ox) samples, before its learned offset.
struct ConvSampling {
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

template <typename acc_t>
DCN_HOST_DEVICE acc_t conv_base_y(const ConvSampling& s, int64_t oy, int64_t ki) {
  return static_cast<acc_t>(oy * s.stride_h - s.pad_h + ki * s.dil_h);
}
template <typename acc_t>
DCN_HOST_DEVICE acc_t conv_base_x(const ConvSampling& s, int64_t ox, int64_t kj) {
  return static_cast<acc_t>(ox * s.stride_w - s.pad_w + kj * s.dil_w);
}

// ---- modulated deformable RoI pooling ----

// One output bin of one RoI: where its sampling grid starts, the step between samples, and how many.
template <typename acc_t>
struct RoIBin {
  acc_t start_y, start_x;  // first sample (already shifted by the bin's offset)
  acc_t step_y, step_x;
  int64_t grid_h, grid_w;
  acc_t roi_h, roi_w;  // the RoI's size on the feature map, which scales the offsets
};

// Adaptive sampling (sampling_ratio <= 0) takes ceil(bin size) samples per side. A degenerate,
// inverted or non-finite RoI takes none (its bins pool to zero); an absurdly large one is capped
// rather than looping for hours: no bin of a real feature map needs more than kMaxRoIGrid per side.
constexpr int64_t kMaxRoIGrid = 1 << 12;

template <typename acc_t>
DCN_HOST_DEVICE int64_t roi_grid_size(acc_t bin_size, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const acc_t n = dcn_ceil(bin_size);
  if (!(n > acc_t(0)) || n - n != acc_t(0)) return 0;  // empty, NaN or infinite: every sample reads zero
  return n < acc_t(kMaxRoIGrid) ? static_cast<int64_t>(n) : kMaxRoIGrid;
}

// roi points at (batch, x1, y1, x2, y2); off_x/off_y are the bin's normalised offsets (0 without).
template <typename acc_t>
DCN_HOST_DEVICE RoIBin<acc_t> roi_bin(acc_t x1, acc_t y1, acc_t x2, acc_t y2, int64_t ph, int64_t pw, int64_t pooled_h,
                                      int64_t pooled_w, acc_t spatial_scale, int64_t sampling_ratio, acc_t gamma,
                                      acc_t off_x, acc_t off_y) {
  RoIBin<acc_t> b;
  const acc_t start_x = x1 * spatial_scale - acc_t(0.5);
  const acc_t start_y = y1 * spatial_scale - acc_t(0.5);
  b.roi_w = x2 * spatial_scale - acc_t(0.5) - start_x;
  b.roi_h = y2 * spatial_scale - acc_t(0.5) - start_y;
  const acc_t bin_h = b.roi_h / acc_t(pooled_h), bin_w = b.roi_w / acc_t(pooled_w);
  b.grid_h = roi_grid_size(bin_h, sampling_ratio);
  b.grid_w = roi_grid_size(bin_w, sampling_ratio);
  b.step_y = b.grid_h > 0 ? bin_h / acc_t(b.grid_h) : acc_t(0);
  b.step_x = b.grid_w > 0 ? bin_w / acc_t(b.grid_w) : acc_t(0);
  b.start_y = start_y + gamma * b.roi_h * off_y + acc_t(ph) * bin_h + acc_t(0.5) * b.step_y;
  b.start_x = start_x + gamma * b.roi_w * off_x + acc_t(pw) * bin_w + acc_t(0.5) * b.step_x;
  return b;
}

}  // namespace mmdet_dcnv2
