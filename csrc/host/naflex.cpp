#include "naflex.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "common/naflex_math.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace glm5v::naflex {

static_assert(static_cast<int>(Filter::Box) == naflex_math::kBox && static_cast<int>(Filter::Bilinear) ==
              naflex_math::kBilinear && static_cast<int>(Filter::Bicubic) == naflex_math::kBicubic &&
              static_cast<int>(Filter::Lanczos) == naflex_math::kLanczos, "Filter ids are naflex_math's");

namespace {

using naflex_math::clip8;
using naflex_math::kHalf;
using naflex_math::kPrecisionBits;

int64_t scaled_side(double scale, int64_t size, int64_t unit) {
  const double scaled = static_cast<double>(size) * scale;
  const int64_t rounded_up = static_cast<int64_t>(std::ceil(scaled / static_cast<double>(unit))) * unit;
  return std::max(unit, rounded_up);
}

// Rows are RGB bytes followed by kRowPad spare bytes: the vector loads below read up to 32 bytes
// from the start of a group of 8 taps, padded taps (weight 0) lying up to 7 pixels past a window.
constexpr int64_t kRowPad = 32;
// The horizontal kernels resample this many rows per call; the rows share every weight.
constexpr int kRowsPerCall = 4;
// Weights are split as hi * 2^kWeightSplitBits + lo so that both halves fit int16.
constexpr int kWeightSplitBits = 11;

// One image's resampling plan, shared by all bands of that image.
struct ImagePlan {
  Coefficients horizontal, vertical;
  // Horizontal weights for the vectorised loops, per output x and group of 8 taps (zero-padded):
  // the 8 high parts then the 8 low parts (weight = hi * 2^11 + lo, both int16); the kernels spread
  // them in registers to meet the shuffled pixels.
  std::vector<int16_t> octet_weights;
  int64_t octets_per_output = 0;
  bool resize_width = false, resize_height = false;
  // Pillow 13's pass order (naflex_math::vertical_first).
  bool vertical_first = false;
};

ImagePlan make_plan(const ImageView& image, const Size& out, Filter filter) {
  ImagePlan plan;
  plan.resize_width = out.width != image.width;
  plan.resize_height = out.height != image.height;
  plan.vertical_first = naflex_math::vertical_first(image.height, image.width, out.height, out.width);
  if (plan.resize_height) plan.vertical = resample_coefficients(image.height, out.height, filter);
  if (plan.resize_width) {
    const Coefficients& k = plan.horizontal = resample_coefficients(image.width, out.width, filter);
    plan.octets_per_output = (k.ksize + 7) / 8;
    plan.octet_weights.assign(static_cast<size_t>(out.width * plan.octets_per_output * 16), 0);
    for (int64_t x = 0; x < out.width; ++x) {
      for (int32_t t = 0; t < k.count[x]; ++t) {
        const int32_t weight = k.weights[x * k.ksize + t];
        int16_t* octet = &plan.octet_weights[(x * plan.octets_per_output + t / 8) * 16];
        octet[t % 8] = static_cast<int16_t>(weight >> kWeightSplitBits);
        octet[8 + t % 8] = static_cast<int16_t>(weight & ((1 << kWeightSplitBits) - 1));
      }
    }
  }
  return plan;
}

struct Band {
  int64_t image, first_patch_row, num_patch_rows;
};

// Row r of the image as padded RGB: a pointer into the image when it already is RGB and the rows
// below absorb the padded reads, otherwise gathered into dst (grey replicated, alpha dropped).
const uint8_t* rgb_row(const ImageView& image, int64_t r, uint8_t* dst) {
  const uint8_t* row = image.data + r * image.stride_h;
  const bool packed_rgb = image.channels == 3 && image.stride_c == 1 && image.stride_w == 3;
  if (packed_rgb && image.stride_h >= 3 * image.width && (image.height - 1 - r) * image.stride_h >= kRowPad) {
    return row;
  }
  for (int64_t x = 0; x < image.width; ++x) {
    const uint8_t* pixel = row + x * image.stride_w;
    for (int c = 0; c < 3; ++c) dst[3 * x + c] = pixel[image.channels == 1 ? 0 : c * image.stride_c];
  }
  std::memset(dst + 3 * image.width, 0, kRowPad);
  return dst;
}

void resample_row_horizontal_scalar(const uint8_t* src, uint8_t* dst, const Coefficients& k, int64_t x_begin,
                                    int64_t x_end) {
  for (int64_t x = x_begin; x < x_end; ++x) {
    const uint8_t* s = src + static_cast<int64_t>(k.first[x]) * 3;
    for (int c = 0; c < 3; ++c) dst[3 * x + c] = naflex_math::resample_value(s + c, 3, &k.weights[x * k.ksize], k.count[x]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// acc0 and acc1 hold the sums of one output pixel of two rows, each as two lanes of (R, G, B, 0);
// adds the lanes, rounds, clips to bytes and stores both pixels. The 4-byte stores write one byte
// past the pixel: the next pixel overwrites it, or it lands in the row pad.
__attribute__((target("avx2"))) inline void store_pixel_pair(__m256i acc0, __m256i acc1, uint8_t* dst0,
                                                             uint8_t* dst1) {
  __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(acc0, acc1, 0x20),
                                 _mm256_permute2x128_si256(acc0, acc1, 0x31));
  sum = _mm256_srai_epi32(_mm256_add_epi32(sum, _mm256_set1_epi32(kHalf)), kPrecisionBits);
  const __m256i words = _mm256_packs_epi32(sum, sum);
  const __m256i bytes = _mm256_packus_epi16(words, words);
  const uint32_t rgb0 = static_cast<uint32_t>(_mm256_extract_epi32(bytes, 0));
  const uint32_t rgb1 = static_cast<uint32_t>(_mm256_extract_epi32(bytes, 4));
  std::memcpy(dst0, &rgb0, 4);
  std::memcpy(dst1, &rgb1, 4);
}

// Two rows at once (they share every weight), four taps per step, exact in 16-bit multiplies:
// each weight is split as hi * 2^11 + lo with both halves in int16, so vpmaddwd, which sums the
// products of adjacent int16 pairs, computes sum(p * hi) and sum(p * lo) over pairs of taps;
// (sum_hi << 11) + sum_lo is the 32-bit sum Pillow forms. 12 RGB bytes (4 taps) are broadcast to
// both 128-bit lanes and shuffled into 16-bit (R_t, R_t+1, G_t, G_t+1, B_t, B_t+1, 0, 0), taps
// t, t+1 in the low lane and t+2, t+3 in the high lane.
__attribute__((target("avx2"))) void resample_row_pair_avx2(const uint8_t* src0, const uint8_t* src1,
                                                            uint8_t* dst0, uint8_t* dst1, const Coefficients& k,
                                                            const ImagePlan& plan, int64_t x_begin, int64_t x_end) {
  const __m256i to_pairs = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
                                            6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
  // The 8 int16 weights of a group of 8 taps spread to (w0 w1 w0 w1 w0 w1 0 0) lanes, taps 0-3
  // (even quads) or 4-7 (odd quads).
  const __m256i spread_even = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, -1, -1, -1, -1,
                                               4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, -1, -1, -1, -1);
  const __m256i spread_odd = _mm256_setr_epi8(8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, -1, -1, -1, -1,
                                              12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15, -1, -1, -1, -1);
  for (int64_t x = x_begin; x < x_end; ++x) {
    const int64_t offset = static_cast<int64_t>(k.first[x]) * 3;
    const uint8_t* s0 = src0 + offset;
    const uint8_t* s1 = src1 + offset;
    const int16_t* w = plan.octet_weights.data() + x * plan.octets_per_output * 16;
    const int32_t quads = (k.count[x] + 3) / 4;
    __m256i hi0 = _mm256_setzero_si256(), lo0 = hi0, hi1 = hi0, lo1 = hi0;
    for (int32_t q = 0; q < quads; ++q) {
      const int16_t* octet = w + (q / 2) * 16;
      const __m256i spread = q % 2 ? spread_odd : spread_even;
      const __m256i w_hi = _mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(octet))), spread);
      const __m256i w_lo = _mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(octet + 8))), spread);
      const __m256i p0 = _mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 12 * q))), to_pairs);
      const __m256i p1 = _mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s1 + 12 * q))), to_pairs);
      hi0 = _mm256_add_epi32(hi0, _mm256_madd_epi16(p0, w_hi));
      lo0 = _mm256_add_epi32(lo0, _mm256_madd_epi16(p0, w_lo));
      hi1 = _mm256_add_epi32(hi1, _mm256_madd_epi16(p1, w_hi));
      lo1 = _mm256_add_epi32(lo1, _mm256_madd_epi16(p1, w_lo));
    }
    store_pixel_pair(_mm256_add_epi32(_mm256_slli_epi32(hi0, kWeightSplitBits), lo0),
                     _mm256_add_epi32(_mm256_slli_epi32(hi1, kWeightSplitBits), lo1), dst0 + 3 * x, dst1 + 3 * x);
  }
}

__attribute__((target("avx2"))) void resample_rows_horizontal_avx2(const uint8_t* const* src, uint8_t* const* dst,
                                                                   const Coefficients& k, const ImagePlan& plan,
                                                                   int64_t x_begin, int64_t x_end) {
  resample_row_pair_avx2(src[0], src[1], dst[0], dst[1], k, plan, x_begin, x_end);
  if (src[2] != src[1]) resample_row_pair_avx2(src[2], src[3], dst[2], dst[3], k, plan, x_begin, x_end);
}

// Four rows at once and eight taps per step with AVX-512: 24 RGB bytes permuted (vpermb, zeroing
// the odd bytes) into the four lanes of (R_t, R_t+1, G_t, G_t+1, B_t, B_t+1, 0, 0), multiplied and
// summed by vpdpwssd; the weights come as 8 high and 8 low int16 and are spread in registers.
// At the end the four lanes of the four rows are summed by two rounds of 128-bit shuffles, which
// leaves row r's pixel in lane r.
__attribute__((target("avx2,avx512f,avx512bw,avx512vbmi,avx512vnni"))) void resample_rows_horizontal_avx512(
    const uint8_t* const* src, uint8_t* const* dst, const Coefficients& k, const ImagePlan& plan, int64_t x_begin,
    int64_t x_end) {
  alignas(64) static const uint8_t kPermutation[64] = {
      0,  0, 3,  0, 1,  0, 4,  0, 2,  0, 5,  0, 0, 0, 0, 0,   // taps 0, 1
      6,  0, 9,  0, 7,  0, 10, 0, 8,  0, 11, 0, 0, 0, 0, 0,   // taps 2, 3
      12, 0, 15, 0, 13, 0, 16, 0, 14, 0, 17, 0, 0, 0, 0, 0,   // taps 4, 5
      18, 0, 21, 0, 19, 0, 22, 0, 20, 0, 23, 0, 0, 0, 0, 0};  // taps 6, 7
  const __m512i permutation = _mm512_load_si512(kPermutation);
  constexpr __mmask64 kPixelBytes = 0x0555055505550555ULL;  // bytes 0, 2, ..., 10 of every lane
  alignas(64) static const int16_t kWeightSpread[32] = {0, 1, 0, 1, 0, 1, 0, 0, 2, 3, 2, 3, 2, 3, 0, 0,
                                                        4, 5, 4, 5, 4, 5, 0, 0, 6, 7, 6, 7, 6, 7, 0, 0};
  const __m512i spread_hi = _mm512_load_si512(kWeightSpread);
  const __m512i spread_lo = _mm512_add_epi16(spread_hi, _mm512_set1_epi16(8));
  constexpr __mmask32 kWeightWords = 0x3F3F3F3F;  // words 0..5 of every lane
  const __m512i half = _mm512_set1_epi32(kHalf);
  const int32_t* first = k.first.data();
  const int32_t* count = k.count.data();
  const int16_t* weights = plan.octet_weights.data();
  // Local copies: the stores below could alias the caller's pointer arrays, these cannot.
  const uint8_t* const rows[4] = {src[0], src[1], src[2], src[3]};
  uint8_t* const outs[4] = {dst[0], dst[1], dst[2], dst[3]};
  for (int64_t x = x_begin; x < x_end; ++x) {
    const int64_t offset = static_cast<int64_t>(first[x]) * 3;
    const int16_t* w = weights + x * plan.octets_per_output * 16;
    const int32_t octets = (count[x] + 7) / 8;
    __m512i hi[4], lo[4];
    for (int r = 0; r < 4; ++r) hi[r] = lo[r] = _mm512_setzero_si512();
    for (int32_t o = 0; o < octets; ++o) {
      const __m512i packed = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * o)));
      const __m512i w_hi = _mm512_maskz_permutexvar_epi16(kWeightWords, spread_hi, packed);
      const __m512i w_lo = _mm512_maskz_permutexvar_epi16(kWeightWords, spread_lo, packed);
      for (int r = 0; r < 4; ++r) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + offset + 24 * o));
        const __m512i p = _mm512_maskz_permutexvar_epi8(kPixelBytes, permutation, _mm512_castsi256_si512(raw));
        hi[r] = _mm512_dpwssd_epi32(hi[r], p, w_hi);
        lo[r] = _mm512_dpwssd_epi32(lo[r], p, w_lo);
      }
    }
    __m512i acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm512_add_epi32(_mm512_slli_epi32(hi[r], kWeightSplitBits), lo[r]);
    // lanes (r0: 0+2, 1+3, r1: 0+2, 1+3) and the same for rows 2, 3; then (r0, r1, r2, r3) totals
    const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i64x2(acc[0], acc[1], 0x44),
                                         _mm512_shuffle_i64x2(acc[0], acc[1], 0xEE));
    const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i64x2(acc[2], acc[3], 0x44),
                                         _mm512_shuffle_i64x2(acc[2], acc[3], 0xEE));
    __m512i total = _mm512_add_epi32(_mm512_shuffle_i64x2(s01, s23, 0x88), _mm512_shuffle_i64x2(s01, s23, 0xDD));
    total = _mm512_max_epi32(_mm512_srai_epi32(_mm512_add_epi32(total, half), kPrecisionBits), _mm512_setzero_si512());
    const __m128i bytes = _mm512_cvtusepi32_epi8(total);  // saturates at 255; negatives were clipped above
    // 4-byte stores: the 4th byte is overwritten by the next pixel or lands in the row pad.
    const uint32_t rgb[4] = {static_cast<uint32_t>(_mm_extract_epi32(bytes, 0)),
                             static_cast<uint32_t>(_mm_extract_epi32(bytes, 1)),
                             static_cast<uint32_t>(_mm_extract_epi32(bytes, 2)),
                             static_cast<uint32_t>(_mm_extract_epi32(bytes, 3))};
    for (int r = 0; r < 4; ++r) std::memcpy(outs[r] + 3 * x, &rgb[r], 4);
  }
}
#endif

void resample_rows_horizontal_scalar(const uint8_t* const* src, uint8_t* const* dst, const Coefficients& k,
                                     const ImagePlan&, int64_t x_begin, int64_t x_end) {
  for (int r = 0; r < kRowsPerCall; ++r) {
    if (r == 0 || src[r] != src[r - 1]) resample_row_horizontal_scalar(src[r], dst[r], k, x_begin, x_end);
  }
}

// The normalisation (value / 255 - mean) / std, as a table for the scalar emitter and as
// per-position mean and std of a patch row (channels repeat every 3 values) for the vector one.
struct Normalization {
  float lut[3 * 256];
  std::vector<float> mean_pattern, std_pattern;
};

Normalization make_normalization(const float* mean, const float* std, int64_t patch_size) {
  Normalization n;
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      n.lut[c * 256 + v] = naflex_math::normalize(v, mean[c], std[c]);
    }
  }
  for (int64_t j = 0; j < patch_size * 3; ++j) {
    n.mean_pattern.push_back(mean[j % 3]);
    n.std_pattern.push_back(std[j % 3]);
  }
  return n;
}

// Where one frame's values go: from patch first_patch on, at slot t_slot of its group, in layout.
struct Destination {
  int64_t first_patch, t_slot;
  const naflex_math::PatchLayout* layout;
};

// Normalises one resized RGB row y and scatters it into its patches.
void emit_row_scalar(const uint8_t* values, int64_t y, int64_t grid_width, const Destination& to,
                     const Normalization& norm, float* patches) {
  const naflex_math::PatchLayout& layout = *to.layout;
  const int64_t patch_size = layout.patch_size, patch_row_len = patch_size * 3;
  const int64_t patch_row = y / patch_size, row_in_patch = y % patch_size;
  const float* lut = norm.lut;
  for (int64_t patch_col = 0; patch_col < grid_width; ++patch_col) {
    const int64_t patch = to.first_patch + naflex_math::patch_index(layout, patch_row, patch_col, grid_width);
    float* dst = patches + patch * naflex_math::patch_dim(layout);
    const uint8_t* src = values + patch_col * patch_row_len;
    if (layout.channel_major) {
      for (int c = 0; c < 3; ++c) {
        float* channel = dst + naflex_math::value_offset(layout, row_in_patch, 0, c, to.t_slot);
        for (int64_t x = 0; x < patch_size; ++x) channel[x] = lut[256 * c + src[3 * x + c]];
      }
      continue;
    }
    // Channel-last: a patch row is patch_row_len consecutive values.
    dst += naflex_math::value_offset(layout, row_in_patch, 0, 0, to.t_slot);
    for (int64_t j = 0; j < patch_row_len; j += 3) {
      dst[j + 0] = lut[src[j + 0]];
      dst[j + 1] = lut[256 + src[j + 1]];
      dst[j + 2] = lut[512 + src[j + 2]];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same values computed 16 at a time: bytes -> float64 products -> float32, minus mean,
// divided by std; IEEE operations in the same order as the table, so the same bits.
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"))) void emit_row_avx512(
    const uint8_t* values, int64_t y, int64_t grid_width, const Destination& to, const Normalization& norm,
    float* patches) {
  const naflex_math::PatchLayout& layout = *to.layout;
  if (layout.channel_major) return emit_row_scalar(values, y, grid_width, to, norm, patches);
  const int64_t patch_size = layout.patch_size, patch_row_len = patch_size * 3;
  const int64_t patch_row = y / patch_size, row_in_patch = y % patch_size;
  const __m512d inv255 = _mm512_set1_pd(1.0 / 255.0);
  const __m512 ones = _mm512_set1_ps(1.0f);
  for (int64_t patch_col = 0; patch_col < grid_width; ++patch_col) {
    const int64_t patch = to.first_patch + naflex_math::patch_index(layout, patch_row, patch_col, grid_width);
    float* dst = patches + patch * naflex_math::patch_dim(layout) +
                 naflex_math::value_offset(layout, row_in_patch, 0, 0, to.t_slot);
    const uint8_t* src = values + patch_col * patch_row_len;
    for (int64_t j = 0; j < patch_row_len; j += 16) {
      const int64_t remaining = patch_row_len - j;
      const __mmask16 mask = remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                                             : static_cast<__mmask16>((1u << remaining) - 1);
      const __m512i ints = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, src + j));
      const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(ints)), inv255));
      const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(ints, 1)), inv255));
      const __m512 scaled = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      const __m512 mean = _mm512_maskz_loadu_ps(mask, norm.mean_pattern.data() + j);
      const __m512 std = _mm512_mask_loadu_ps(ones, mask, norm.std_pattern.data() + j);
      _mm512_mask_storeu_ps(dst + j, mask, _mm512_div_ps(_mm512_sub_ps(scaled, mean), std));
    }
  }
}
#endif

// Resamples outputs [x_begin, x_end) of kRowsPerCall rows, src[r] -> dst[r]; a caller with fewer
// rows repeats its last one (same source and destination), which the kernels may skip.
using HorizontalKernel = void (*)(const uint8_t* const*, uint8_t* const*, const Coefficients&, const ImagePlan&,
                                  int64_t, int64_t);

// Normalises and scatters one resized row (see emit_row_scalar).
using EmitRow = void (*)(const uint8_t*, int64_t, int64_t, const Destination&, const Normalization&, float*);

// One instruction set's horizontal resampler and row emitter.
struct NamedKernel {
  const char* name;
  HorizontalKernel kernel;
  EmitRow emit;
  bool (*supported)();
};

const NamedKernel kHorizontalKernels[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"avx512", resample_rows_horizontal_avx512, emit_row_avx512,
     [] {
       return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
     }},
    {"avx2", resample_rows_horizontal_avx2, emit_row_scalar,
     [] { return static_cast<bool>(__builtin_cpu_supports("avx2")); }},
#endif
    {"scalar", resample_rows_horizontal_scalar, emit_row_scalar, [] { return true; }},
};

// The fastest kernel this CPU runs; select_horizontal_kernel may choose another.
const NamedKernel* pick_horizontal_kernel() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();  // this runs during static initialisation, maybe before libgcc's own
#endif
  for (const NamedKernel& k : kHorizontalKernels) {
    if (k.supported()) return &k;
  }
  return nullptr;  // unreachable: the scalar kernel runs everywhere
}

std::atomic<const NamedKernel*> horizontal_kernel{pick_horizontal_kernel()};

EmitRow selected_emitter() { return horizontal_kernel.load(std::memory_order_relaxed)->emit; }

void resample_rows_horizontal(const uint8_t* const* src, uint8_t* const* dst, const Coefficients& k,
                              const ImagePlan& plan, int64_t x_begin, int64_t x_end) {
  horizontal_kernel.load(std::memory_order_relaxed)->kernel(src, dst, k, plan, x_begin, x_end);
}

// Output row y of the vertical pass over source rows rows[i] = row first_row + i, row_len bytes.
// Compiled for AVX2 too and chosen at load time: the loops vectorise as they are.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
void resample_row_vertical(const uint8_t* const* rows, int64_t first_row, const Coefficients& k, int64_t y,
                           int64_t row_len, int32_t* accumulator, uint8_t* dst) {
  for (int64_t j = 0; j < row_len; ++j) accumulator[j] = kHalf;
  const int32_t* w = &k.weights[y * k.ksize];
  for (int32_t t = 0; t < k.count[y]; ++t) {
    const uint8_t* src = rows[k.first[y] + t - first_row];
    const int32_t weight = w[t];
    for (int64_t j = 0; j < row_len; ++j) accumulator[j] += src[j] * weight;
  }
  for (int64_t j = 0; j < row_len; ++j) dst[j] = clip8(accumulator[j]);
}

void pack_band(const ImageView& image, const Size& out, const ImagePlan& plan, const Band& band,
               const FrameSlot& slot, const naflex_math::PatchLayout& layout, const Normalization& norm,
               float* patches, int32_t* position_ids, int id_width) {
  const EmitRow emit_row = selected_emitter();
  const int64_t patch_size = layout.patch_size;
  const Destination to{slot.first_patch, slot.t_slot, &layout};
  const int64_t in_row_len = image.width * 3, out_row_len = out.width * 3;
  const int64_t grid_width = out.width / patch_size;
  const int64_t y_begin = band.first_patch_row * patch_size;
  const int64_t y_end = y_begin + band.num_patch_rows * patch_size;
  const Coefficients& vk = plan.vertical;

  // The input rows this band reads.
  const naflex_math::Span in_rows = plan.resize_height
                                        ? naflex_math::window_span(&vk.first[y_begin], &vk.count[y_begin], y_end - y_begin)
                                        : naflex_math::Span{y_begin, y_end};
  const int64_t in_begin = in_rows.begin, in_end = in_rows.end;
  const int64_t num_rows = in_end - in_begin;
  const int64_t in_stride = in_row_len + kRowPad, out_stride = out_row_len + kRowPad;
  thread_local std::vector<uint8_t> staged, widened, line, resized;
  thread_local std::vector<const uint8_t*> rows;
  thread_local std::vector<int32_t> accumulator;
  staged.resize(static_cast<size_t>(num_rows * in_stride));
  rows.resize(static_cast<size_t>(num_rows));
  for (int64_t i = 0; i < num_rows; ++i) rows[i] = rgb_row(image, in_begin + i, &staged[i * in_stride]);

  if (!plan.vertical_first && plan.resize_width) {
    widened.resize(static_cast<size_t>(num_rows * out_stride));
    for (int64_t i = 0; i < num_rows; i += kRowsPerCall) {
      const uint8_t* src[kRowsPerCall];
      uint8_t* dst[kRowsPerCall];
      for (int r = 0; r < kRowsPerCall; ++r) {
        const int64_t row = std::min<int64_t>(i + r, num_rows - 1);
        src[r] = rows[row];
        dst[r] = &widened[row * out_stride];
      }
      resample_rows_horizontal(src, dst, plan.horizontal, plan, 0, out.width);
    }
    for (int64_t i = 0; i < num_rows; ++i) rows[i] = &widened[i * out_stride];
  }
  // Output rows go in groups, which the horizontal kernel resamples together when it runs second.
  const int64_t source_row_len = plan.vertical_first ? in_row_len : out_row_len;
  const int64_t line_stride = source_row_len + kRowPad;
  line.resize(static_cast<size_t>(kRowsPerCall * line_stride));
  accumulator.resize(static_cast<size_t>(source_row_len));
  resized.resize(static_cast<size_t>(kRowsPerCall * out_stride));
  for (int64_t y = y_begin; y < y_end; y += kRowsPerCall) {
    const int64_t group = std::min<int64_t>(kRowsPerCall, y_end - y);
    const uint8_t* values[kRowsPerCall];
    uint8_t* resized_rows[kRowsPerCall];
    for (int64_t i = 0; i < kRowsPerCall; ++i) {
      const int64_t r = std::min(i, group - 1);
      if (i == r && plan.resize_height) {
        resample_row_vertical(rows.data(), in_begin, vk, y + r, source_row_len, accumulator.data(),
                              &line[r * line_stride]);
      }
      values[i] = plan.resize_height ? &line[r * line_stride] : rows[y + r - in_begin];
      resized_rows[i] = &resized[r * out_stride];
    }
    if (plan.vertical_first && plan.resize_width) {
      resample_rows_horizontal(values, resized_rows, plan.horizontal, plan, 0, out.width);
      for (int64_t i = 0; i < group; ++i) values[i] = resized_rows[i];
    }
    for (int64_t i = 0; i < group; ++i) emit_row(values[i], y + i, grid_width, to, norm, patches);
  }

  // One frame of a group writes the group's position ids: (row, col), or (t, row, col) for video.
  if (slot.t_slot != 0) return;
  for (int64_t patch_row = band.first_patch_row; patch_row < band.first_patch_row + band.num_patch_rows;
       ++patch_row) {
    for (int64_t patch_col = 0; patch_col < grid_width; ++patch_col) {
      const int64_t patch = slot.first_patch + naflex_math::patch_index(layout, patch_row, patch_col, grid_width);
      int32_t* ids = position_ids + id_width * patch;
      if (id_width == 3) *ids++ = static_cast<int32_t>(slot.t_group);
      ids[0] = static_cast<int32_t>(patch_row);
      ids[1] = static_cast<int32_t>(patch_col);
    }
  }
}

}  // namespace

std::vector<std::string> supported_horizontal_kernels() {
  std::vector<std::string> names;
  for (const NamedKernel& k : kHorizontalKernels) {
    if (k.supported()) names.emplace_back(k.name);
  }
  return names;
}

std::string selected_horizontal_kernel() { return horizontal_kernel.load()->name; }

void select_horizontal_kernel(const std::string& name) {
  for (const NamedKernel& k : kHorizontalKernels) {
    if (name == k.name && k.supported()) {
      horizontal_kernel.store(&k);
      return;
    }
  }
  throw std::invalid_argument("kernel '" + name + "' is not one this CPU runs");
}

Filter parse_filter(const std::string& name) {
  if (name == "box") return Filter::Box;
  if (name == "bilinear") return Filter::Bilinear;
  if (name == "bicubic") return Filter::Bicubic;
  if (name == "lanczos") return Filter::Lanczos;
  throw std::invalid_argument("resample must be one of 'box', 'bilinear', 'bicubic', 'lanczos'; got '" +
                              name + "'");
}

Size target_size(int64_t height, int64_t width, int64_t patch_size, int64_t merge_size,
                 int64_t max_num_patches) {
  const int64_t unit = patch_size * merge_size;
  constexpr double eps = 1e-5;
  double scale_min = eps / 10, scale_max = 100.0;
  while (scale_max - scale_min >= eps) {
    const double scale = (scale_min + scale_max) / 2;
    const int64_t h = scaled_side(scale, height, unit), w = scaled_side(scale, width, unit);
    const double num_patches = (static_cast<double>(h) / patch_size) * (static_cast<double>(w) / patch_size);
    if (num_patches <= static_cast<double>(max_num_patches)) {
      scale_min = scale;
    } else {
      scale_max = scale;
    }
  }
  return {scaled_side(scale_min, height, unit), scaled_side(scale_min, width, unit)};
}

Coefficients resample_coefficients(int64_t in_size, int64_t out_size, Filter filter) {
  const int id = static_cast<int>(filter);
  Coefficients k;
  k.ksize = naflex_math::kernel_size(in_size, out_size, id);
  k.first.resize(out_size);
  k.count.resize(out_size);
  k.weights.assign(static_cast<size_t>(out_size * k.ksize), 0);
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const naflex_math::Window w = naflex_math::window(in_size, out_size, id, xx);
    for (int32_t t = 0; t < w.count; ++t) k.weights[xx * k.ksize + t] = naflex_math::fixed_weight(w, id, t);
    k.first[xx] = w.first;
    k.count[xx] = w.count;
  }
  return k;
}

int64_t widest_patch_span(int64_t in_size, int64_t out_size, int64_t patch_size, Filter filter) {
  if (in_size == out_size) return patch_size;
  const Coefficients k = resample_coefficients(in_size, out_size, filter);
  int64_t widest = 0;
  for (int64_t first = 0; first + patch_size <= out_size; first += patch_size) {
    const naflex_math::Span s = naflex_math::window_span(&k.first[first], &k.count[first], patch_size);
    widest = std::max(widest, s.end - s.begin);
  }
  return widest;
}

void pack(const std::vector<ImageView>& images, const std::vector<Size>& targets, const std::vector<FrameSlot>& slots,
          const naflex_math::PatchLayout& layout, const float* mean, const float* std, Filter filter, float* patches,
          int32_t* position_ids, int id_width, int num_threads) {
  const int64_t patch_size = layout.patch_size;
  const int64_t num_images = static_cast<int64_t>(images.size());
  std::vector<ImagePlan> plans(num_images);
  parallel_for(num_images, num_threads, [&](int64_t i) { plans[i] = make_plan(images[i], targets[i], filter); });
  const Normalization norm = make_normalization(mean, std, patch_size);

  // Bands of patch rows: about four per thread so uneven images balance, each as tall as allowed,
  // since a band re-reads the input rows its filter window shares with its neighbours.
  int64_t total_patch_rows = 0;
  for (const Size& t : targets) total_patch_rows += t.height / patch_size;
  const int64_t tasks_wanted = 4 * static_cast<int64_t>(std::max(num_threads, 1));
  const int64_t rows_per_band = std::max<int64_t>(1, (total_patch_rows + tasks_wanted - 1) / tasks_wanted);
  std::vector<Band> bands;
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t grid_height = targets[i].height / patch_size;
    for (int64_t r = 0; r < grid_height; r += rows_per_band) {
      bands.push_back({i, r, std::min(rows_per_band, grid_height - r)});
    }
  }
  parallel_for(static_cast<int64_t>(bands.size()), num_threads, [&](int64_t b) {
    const Band& band = bands[b];
    pack_band(images[band.image], targets[band.image], plans[band.image], band, slots[band.image], layout, norm,
              patches, position_ids, id_width);
  });
}

}  // namespace glm5v::naflex
