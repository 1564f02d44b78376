// NaFlex per-pixel arithmetic shared by the host C++ path (csrc/host/naflex.cpp) and the CUDA
// kernel (csrc/cuda/naflex.cu): Pillow 13's resampling filters and 22-bit fixed-point weights, the
// accumulate-round-clip rule of one resampling pass, the pass order, the normalisation of an
// 8-bit value and the address of a value in the packed patch buffer; and the index arithmetic of
// the GPU kernel's input staging (window spans, staged tile layout, 16-byte split of a row), which
// the CPU tests run through the host module.
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
typedef unsigned long long uint64_t;
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

// Inputs [begin, end) along an axis.
struct Span {
  int64_t begin, end;
};

// The inputs that n >= 1 windows (first[i], count[i], as in a resampling plan) read together: a band
// of output rows on the host, a patch's windows along either axis on the GPU.
NAFLEX_HD Span window_span(const int32_t* first, const int32_t* count, int64_t n) {
  Span s{first[0], static_cast<int64_t>(first[0]) + count[0]};
  for (int64_t i = 1; i < n; ++i) {
    if (first[i] < s.begin) s.begin = first[i];
    if (first[i] + count[i] > s.end) s.end = static_cast<int64_t>(first[i]) + count[i];
  }
  return s;
}

// Staging a rectangle of a frame (rows x cols pixels, 3 channels or 1 for grey) into a tile of
// shared memory, which the GPU's first resampling pass then reads instead of global memory.
//
// A frame whose pixels are packed (pixel stride 1..4 bytes, channel stride 0 or 1: grey, RGB, RGBA,
// HWC views) is copied raw: each tile row holds the bytes of one frame row from the rectangle's first
// to its last byte read. When moreover the row stride is a multiple of 16 bytes, every row starts at
// the same address modulo 16, so a row is copied as a scalar head up to the first 16-byte boundary,
// 16-byte words, and a scalar tail; the tile keeps the frame's alignment (row r at r * pitch + lead,
// lead = the first byte's address mod 16) so the words land on 16-byte boundaries of the tile too.
// Other layouts (channel-major frames, wide pixel strides) are gathered byte by byte into packed RGB
// (or grey) tile rows.
constexpr int64_t kVectorBytes = 16;

// A byte range [address, address + length) as a scalar head up to the first 16-byte boundary,
// `words` aligned 16-byte words, and a scalar tail.
struct VectorSplit {
  int64_t head, words, tail;
};

NAFLEX_HD VectorSplit split_for_vectors(uint64_t address, int64_t length) {
  int64_t head = static_cast<int64_t>((kVectorBytes - address % kVectorBytes) % kVectorBytes);
  if (head > length) head = length;
  const int64_t words = (length - head) / kVectorBytes;
  return {head, words, length - head - words * kVectorBytes};
}

// Byte offset, from the start of the range, of piece k of a split: pieces are the head's bytes, then
// the words, then the tail's bytes; k < head + words + tail.
NAFLEX_HD int64_t piece_offset(const VectorSplit& s, int64_t k) {
  if (k < s.head) return k;
  if (k < s.head + s.words) return s.head + (k - s.head) * kVectorBytes;
  return k + s.words * (kVectorBytes - 1);
}

struct StagedTile {
  int64_t rows, cols;
  int64_t stride_h, stride_w, stride_c;  // of the frame, in bytes
  bool raw, vectorised;
  int64_t row_bytes;  // bytes copied per row
  int64_t pitch;      // bytes between tile rows, a multiple of 16
  int64_t lead;       // offset of a row's first byte in its tile row
  int64_t pixel_stride, channel_stride;  // in the tile
  VectorSplit split;  // of every row (all head when not vectorised)
};

// The tile of a rows x cols rectangle whose pixel (0, 0) channel 0 is at address. The pitch does not
// depend on the address, so the host can size shared memory without knowing where frames lie.
NAFLEX_HD StagedTile staged_tile(uint64_t address, int64_t stride_h, int64_t stride_w, int64_t stride_c, int64_t rows,
                                 int64_t cols) {
  StagedTile t;
  t.rows = rows;
  t.cols = cols;
  t.stride_h = stride_h;
  t.stride_w = stride_w;
  t.stride_c = stride_c;
  const int64_t channels = stride_c != 0 ? 3 : 1;
  t.raw = stride_w >= 1 && stride_w <= 4 && stride_c >= 0 && stride_c <= 1;
  t.vectorised = t.raw && stride_h % kVectorBytes == 0;
  if (t.raw) {
    t.row_bytes = cols > 0 ? (cols - 1) * stride_w + (channels - 1) * stride_c + 1 : 0;
    t.pixel_stride = stride_w;
    t.channel_stride = stride_c;
  } else {
    t.row_bytes = cols * channels;
    t.pixel_stride = channels;
    t.channel_stride = channels == 3 ? 1 : 0;
  }
  t.lead = t.vectorised ? static_cast<int64_t>(address % kVectorBytes) : 0;
  const int64_t padded = t.row_bytes + (t.vectorised ? kVectorBytes - 1 : 0);
  t.pitch = (padded + kVectorBytes - 1) / kVectorBytes * kVectorBytes;
  t.split = t.vectorised ? split_for_vectors(address, t.row_bytes) : VectorSplit{t.row_bytes, 0, 0};
  return t;
}

NAFLEX_HD int64_t tile_bytes(const StagedTile& t) { return t.rows * t.pitch; }

// Offset in the tile of channel `channel` of pixel (row, col) of the rectangle.
NAFLEX_HD int64_t tile_offset(const StagedTile& t, int64_t row, int64_t col, int64_t channel) {
  return row * t.pitch + t.lead + col * t.pixel_stride + channel * t.channel_stride;
}

// Copy steps of a tile: one byte or one 16-byte word each, spread over the threads of a block.
NAFLEX_HD int64_t stage_steps(const StagedTile& t) {
  const int64_t per_row = t.raw ? t.split.head + t.split.words + t.split.tail : t.row_bytes;
  return t.rows * per_row;
}

// Frame bytes are read-only while a kernel runs: on the device they go through the read-only cache.
NAFLEX_HD uint8_t load_frame_byte(const uint8_t* from) {
#if defined(__CUDA_ARCH__)
  return __ldg(from);
#else
  return *from;
#endif
}

// Copies the 16 bytes at from (16-byte aligned) to to (16-byte aligned): one vector load and store
// on the device.
NAFLEX_HD void copy_frame_word(const uint8_t* from, uint8_t* to) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(to) = __ldg(reinterpret_cast<const uint4*>(from));
#else
  for (int64_t b = 0; b < kVectorBytes; ++b) to[b] = from[b];
#endif
}

// Copy step `step` of the tile of the rectangle at src into tile (16-byte aligned). The step's
// indices are 32-bit: a tile fits shared memory.
NAFLEX_HD void stage_step(const StagedTile& t, const uint8_t* src, uint8_t* tile, int64_t step) {
  const int32_t s = static_cast<int32_t>(step);
  if (!t.raw) {
    const int32_t channels = static_cast<int32_t>(t.pixel_stride), per_row = static_cast<int32_t>(t.row_bytes);
    const int32_t row = s / per_row, col = s % per_row / channels, channel = s % per_row % channels;
    tile[tile_offset(t, row, col, channel)] =
        load_frame_byte(src + row * t.stride_h + col * t.stride_w + channel * t.stride_c);
    return;
  }
  const int32_t per_row = static_cast<int32_t>(t.split.head + t.split.words + t.split.tail);
  const int32_t row = s / per_row, k = s % per_row;
  const int64_t offset = piece_offset(t.split, k);
  const uint8_t* from = src + row * t.stride_h + offset;
  uint8_t* to = tile + row * t.pitch + t.lead + offset;
  if (k >= t.split.head && k < t.split.head + t.split.words) {
    copy_frame_word(from, to);
  } else {
    *to = load_frame_byte(from);
  }
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
