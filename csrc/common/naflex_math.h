// NaFlex per-pixel arithmetic shared by the host C++ path (csrc/host/naflex.cpp) and the CUDA
// kernel (csrc/cuda/naflex.cu): Pillow 13's resampling filters and 22-bit fixed-point weights, the
// accumulate-round-clip rule of one resampling pass, the pass order, the normalisation of an
// 8-bit value and the address of a value in the packed patch buffer.
//
// Every function is plain IEEE arithmetic with no fused multiply-adds in the host build; the CUDA
// build must be compiled with --fmad=false so the device rounds the same way (the weights are
// rounded to integers, and one ulp in a product can move a weight by one). Only the Lanczos filter
// calls a transcendental (sin), whose device and host results may differ in the last ulp.
#pragma once

#if defined(__CUDACC__)
#define NAFLEX_HD __host__ __device__ __forceinline__
#else
#define NAFLEX_HD inline
#endif

#if defined(__CUDACC_RTC__)
// NVRTC compiles without the C library headers.
typedef unsigned char uint8_t;
typedef int int32_t;
typedef long long int64_t;
#else
#include <cmath>
#include <cstdint>
#endif

namespace glm5v {
namespace naflex_math {

// Pillow's fixed-point precision for 8-bit images: 32 - 8 (value) - 2 (headroom) bits.
constexpr int kPrecisionBits = 22;
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
constexpr double kPi = 3.14159265358979323846;

// Filter ids, in the order of glm5v::naflex::Filter.
enum FilterId : int { kBox = 0, kBilinear = 1, kBicubic = 2, kLanczos = 3 };

NAFLEX_HD double filter_support(int filter) {
  return filter == kBox ? 0.5 : filter == kBilinear ? 1.0 : filter == kBicubic ? 2.0 : 3.0;
}

NAFLEX_HD double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= kPi;
  return sin(x) / x;
}

NAFLEX_HD double filter_weight(int filter, double x) {
  switch (filter) {
    case kBox: return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
    case kBilinear:
      if (x < 0.0) x = -x;
      return x < 1.0 ? 1.0 - x : 0.0;
    case kBicubic: {
      const double a = -0.5;
      if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    }
    default: return (x >= -3.0 && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0;
  }
}

// The window of input samples output index `out_index` reads along one axis, and what its
// weights are computed from.
struct Window {
  int32_t first, count;  // inputs [first, first + count)
  double center, inv_filterscale, total;
};

// Taps of the widest window along an axis resized from in_size to out_size (Pillow's ksize).
NAFLEX_HD int64_t kernel_size(int64_t in_size, int64_t out_size, int filter) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double support = filter_support(filter) * (scale < 1.0 ? 1.0 : scale);
  return static_cast<int64_t>(ceil(support)) * 2 + 1;
}

NAFLEX_HD Window window(int64_t in_size, int64_t out_size, int filter, int64_t out_index) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter_support(filter) * filterscale;
  Window w;
  w.center = (out_index + 0.5) * scale;
  w.inv_filterscale = 1.0 / filterscale;
  int64_t first = static_cast<int64_t>(w.center - support + 0.5);
  if (first < 0) first = 0;
  int64_t last = static_cast<int64_t>(w.center + support + 0.5);
  if (last > in_size) last = in_size;
  w.first = static_cast<int32_t>(first);
  w.count = static_cast<int32_t>(last - first);
  w.total = 0.0;
  for (int32_t t = 0; t < w.count; ++t) w.total += filter_weight(filter, (t + first - w.center + 0.5) * w.inv_filterscale);
  return w;
}

// The fixed-point weight of tap t of a window: the filter value normalised by the window's sum,
// scaled by 2^22 and rounded half away from zero.
NAFLEX_HD int32_t fixed_weight(const Window& w, int filter, int32_t t) {
  const double value = filter_weight(filter, (t + w.first - w.center + 0.5) * w.inv_filterscale);
  const double normalised = w.total != 0.0 ? value / w.total : value;
  const double fixed = normalised * (1 << kPrecisionBits);
  return static_cast<int32_t>(normalised < 0 ? -0.5 + fixed : 0.5 + fixed);
}

// A resampling pass's sum of products starts at kHalf (round to nearest), is shifted back by 22
// bits and clipped to 8 bits.
NAFLEX_HD uint8_t clip8(int32_t accumulated) {
  const int32_t value = accumulated >> kPrecisionBits;
  return static_cast<uint8_t>(value < 0 ? 0 : (value > 255 ? 255 : value));
}

// Adds count products of 8-bit samples src[t * stride] and 22-bit weights to acc.
NAFLEX_HD int32_t accumulate(int32_t acc, const uint8_t* src, int64_t stride, const int32_t* weights, int32_t count) {
  for (int32_t t = 0; t < count; ++t) acc += static_cast<int32_t>(src[t * stride]) * weights[t];
  return acc;
}

// One output value of a resampling pass.
NAFLEX_HD uint8_t resample_value(const uint8_t* src, int64_t stride, const int32_t* weights, int32_t count) {
  return clip8(accumulate(kHalf, src, stride, weights, count));
}

// Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
// pixels as the width; each pass rounds to 8 bits, so the order is part of the result.
NAFLEX_HD bool vertical_first(int64_t in_height, int64_t in_width, int64_t out_height, int64_t out_width) {
  const int64_t height_drop = in_height - out_height, width_drop = in_width - out_width;
  return height_drop > 0 && height_drop > width_drop * 2;
}

// (float32(value / 255) - mean) / std in float32: the HF processor's rescale then normalise.
NAFLEX_HD float normalize(int value, float mean, float std) {
  const float scaled = static_cast<float>(static_cast<double>(value) * (1.0 / 255.0));
  return (scaled - mean) / std;
}

// Where patches go in the packed buffer.
// Images (pack_images): patches of a frame in row-major order, values (row, col, channel) inside
// a patch. Video (pack_video, the Qwen2-VL / GLM-4V convention): temporal_patch_size frames share
// each patch; patches of a group of frames go merge_size x merge_size block by block (row-major
// blocks, row-major inside a block) so a patch merger takes consecutive runs; values
// (channel, frame in group, row, col) inside a patch, the order a Conv3d patch embedding reads.
struct PatchLayout {
  int64_t patch_size, temporal_patch_size, merge_size;
  bool channel_major;
};

NAFLEX_HD int64_t patch_dim(const PatchLayout& layout) {
  return 3 * layout.temporal_patch_size * layout.patch_size * layout.patch_size;
}

// Sequence index of patch (row, col) of a grid grid_width patches wide, from its frame's first.
NAFLEX_HD int64_t patch_index(const PatchLayout& layout, int64_t row, int64_t col, int64_t grid_width) {
  const int64_t m = layout.merge_size;
  if (m == 1) return row * grid_width + col;
  return ((row / m) * (grid_width / m) + col / m) * m * m + (row % m) * m + col % m;
}

// Offset of value (y, x, channel) of frame t_slot of its group inside its patch; y, x in the patch.
NAFLEX_HD int64_t value_offset(const PatchLayout& layout, int64_t y, int64_t x, int64_t channel, int64_t t_slot) {
  const int64_t p = layout.patch_size;
  if (layout.channel_major) return ((channel * layout.temporal_patch_size + t_slot) * p + y) * p + x;
  return (y * p + x) * 3 + channel;
}

}  // namespace naflex_math
}  // namespace glm5v
