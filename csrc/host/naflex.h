// NaFlex image preprocessing: aspect-preserving resize to a patch budget, normalisation and
// patchify, all images packed into one buffer without padding.
//
// The resampling is Pillow 13's (Resample.c) to the bit: separable filters with 22-bit fixed-point
// coefficients, rounding to 8 bits after each pass, the passes in Pillow's order. That is what
// transformers' Siglip2 image processor runs (PIL resize of uint8 RGB), so packed patches agree
// with it exactly. glm5v_kernels/data/reference.py is the specification in numpy.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/naflex_math.h"

namespace glm5v::naflex {

enum class Filter { Box, Bilinear, Bicubic, Lanczos };

Filter parse_filter(const std::string& name);

// uint8 pixels at data[y * stride_h + x * stride_w + c * stride_c] (strides in elements, may be
// negative). channels: 1 (grey, replicated to RGB), 3 (RGB) or 4 (RGBA, alpha ignored).
struct ImageView {
  const uint8_t* data;
  int64_t height, width, channels;
  int64_t stride_h, stride_w, stride_c;
};

struct Size {
  int64_t height, width;
};

// The largest aspect-preserving size whose patch grid fits max_num_patches: binary search on the
// scale (the search of big_vision / transformers' get_image_size_for_max_num_patches), each side a
// multiple of patch_size * merge_size and at least one such unit.
Size target_size(int64_t height, int64_t width, int64_t patch_size, int64_t merge_size,
                 int64_t max_num_patches);

// Pillow's fixed-point resampling weights for one axis: output index i reads inputs
// [first[i], first[i] + count[i]) with weights[i * ksize + t].
struct Coefficients {
  int64_t ksize = 0;
  std::vector<int32_t> first, count, weights;
};

Coefficients resample_coefficients(int64_t in_size, int64_t out_size, Filter filter);

// The most inputs the windows of one patch (patch_size consecutive outputs, out_size a multiple of
// patch_size) read along an axis resized from in_size to out_size: patch_size when the axis keeps its
// size (not resampled). Sizes the GPU kernel's staged tiles.
int64_t widest_patch_span(int64_t in_size, int64_t out_size, int64_t patch_size, Filter filter);

// Where frame i's values go: patches first_patch onwards (its group's), slot t_slot of the group's
// temporal_patch_size frames; t_group is the group's index, written into (t, row, col) ids.
struct FrameSlot {
  int64_t first_patch, t_slot, t_group;
};

// Resizes images[i] to targets[i], normalises every value v of channel c to
// (float32(v / 255) - mean[c]) / std[c] in float32 (the HF processor's steps) and writes it into
// patches at the place layout gives (naflex_math::patch_index and value_offset) from slots[i].
// The frames with t_slot 0 write position_ids: id_width 2 gives (row, col) of every patch, id_width
// 3 (t_group, row, col). Work is split into bands of patch rows shared by num_threads threads.
void pack(const std::vector<ImageView>& images, const std::vector<Size>& targets, const std::vector<FrameSlot>& slots,
          const naflex_math::PatchLayout& layout, const float* mean, const float* std, Filter filter, float* patches,
          int32_t* position_ids, int id_width, int num_threads);

// The horizontal pass has vectorised kernels ("avx512", "avx2") and a portable one ("scalar"),
// all exact; the fastest one the CPU runs is used unless another is selected (tests run each).
std::vector<std::string> supported_horizontal_kernels();
std::string selected_horizontal_kernel();
void select_horizontal_kernel(const std::string& name);

}  // namespace glm5v::naflex
