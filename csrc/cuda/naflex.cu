// NaFlex on the GPU: decoded uint8 frames (anywhere in device memory, any strides) resized with
// Pillow 13's antialiased filters, normalised and written as packed patches, every frame of a
// batch in one launch. The arithmetic is csrc/common/naflex_math.h, the header the host path
// (csrc/host/naflex.cpp) runs, so both produce the same bits; compile with --fmad=false.
//
// One block makes one output patch of one frame, one thread per output pixel (patch_size² threads).
// The two resampling passes run in Pillow's order (naflex_math::vertical_first): the first pass
// resamples axis A to the patch's patch_size output positions for every input position along the
// other axis B that the patch's second-pass windows read, into shared memory, a chunk of B at a time;
// the second pass accumulates each chunk into the thread's three channel sums. Each pass rounds to
// 8 bits as Pillow does; an axis that keeps its size is not resampled (Pillow skips the pass).
//
// The input the first pass reads for a chunk (the chunk's positions along B times the patch's
// window span along A, all channels) is first staged into shared memory by the whole block
// (naflex_math::staged_tile / stage_step). Frames with packed pixels (grey, RGB, RGBA: pixel stride
// <= 4 bytes, channel stride 0 or 1) are copied row by row as raw bytes, with 16-byte vector loads
// and stores when the row stride is a multiple of 16 (then every row has the same alignment: a
// scalar head up to the first 16-byte boundary, 16-byte words, a scalar tail); with other row
// strides the same copy runs byte by byte. Other layouts (channel-major frames, wide pixel strides)
// are gathered byte by byte into packed tile rows. The first pass then reads the tile with the same
// weights in the same order, so the result is unchanged.
//
// Launched by glm5v_kernels/data/cuda.py, which builds the frame table and sizes shared memory.
#include "../common/naflex_math.h"

namespace nm = glm5v::naflex_math;

// Fields of one row of the frame table (int64).
enum FrameField {
  kData = 0,        // address of pixel (0, 0, 0)
  kHeight,          // input size
  kWidth,
  kStrideH,         // strides in bytes; the channel stride is 0 for grey frames
  kStrideW,
  kStrideC,
  kOutHeight,       // resized size, multiples of patch_size
  kOutWidth,
  kFirstPatch,      // the frame's (or its temporal group's) first patch in the output
  kTSlot,           // slot of the frame in its temporal group
  kTGroup,          // index of the group, the t of (t, row, col) position ids
  kFirstBlock,      // first block of this frame: blocks of earlier frames, one per patch
  kFrameFields
};

// patch_size <= 24: one thread per pixel, and 65536 registers / 576 threads leaves ~113 per thread
// (the kernel needs ~84; capping it at 64 for 1024 threads spills).
constexpr int kMaxThreads = 576;

struct Axis {
  long long in_size, out_size, origin;
};

// Window of output origin + i along an axis into shared memory: first, count and the fixed-point
// weights. An axis that keeps its size reads one input with weight 1.0 (identity).
__device__ __forceinline__ void load_window(const Axis& axis, int filter, int i, int ksize, int* first, int* count,
                                            int* weights) {
  const long long out_index = axis.origin + i;
  if (axis.in_size == axis.out_size) {
    first[i] = static_cast<int>(out_index);
    count[i] = 1;
    weights[i * ksize] = 1 << nm::kPrecisionBits;
    return;
  }
  const nm::Window w = nm::window(axis.in_size, axis.out_size, filter, out_index);
  first[i] = w.first;
  count[i] = w.count;
  for (int t = 0; t < w.count; ++t) weights[i * ksize + t] = nm::fixed_weight(w, filter, t);
}

// frames: (num_frames, kFrameFields) int64, frames in output order; patches and position_ids
// (num_patches, 2 or 3) as laid out by naflex_math::patch_index / value_offset. ksize: the widest
// window of the batch; chunk: input positions along B per shared-memory chunk; tile_offset: where the
// staged tile starts in dynamic shared memory, round_up(3072 + 16 * p + 8 * p * ksize + 3 * p * chunk,
// 16) bytes; the launcher adds the largest tile of the batch (naflex_math::tile_bytes).
extern "C" __global__ void __launch_bounds__(kMaxThreads) naflex_pack_frames(const long long* __restrict__ frames, int num_frames, int patch_size,
                                              int temporal_patch_size, int merge_size, int channel_major,
                                              int id_width, int filter, int ksize, int chunk, int tile_offset,
                                              float mean0, float mean1, float mean2, float std0, float std1, float std2,
                                              float* __restrict__ patches, int* __restrict__ position_ids) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int p = patch_size;
  float* lut = reinterpret_cast<float*>(shared);
  int* first_a = reinterpret_cast<int*>(lut + 768);
  int* count_a = first_a + p;
  int* first_b = count_a + p;
  int* count_b = first_b + p;
  int* weights_a = count_b + p;
  int* weights_b = weights_a + p * ksize;
  unsigned char* inter = reinterpret_cast<unsigned char*>(weights_b + p * ksize);
  unsigned char* staged = shared + tile_offset;

  // The frame of this block: the last one whose first block is <= blockIdx.x.
  const long long block = blockIdx.x;
  int lo = 0, hi = num_frames - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (frames[mid * kFrameFields + kFirstBlock] <= block) lo = mid; else hi = mid - 1;
  }
  const long long* frame = frames + lo * kFrameFields;
  const unsigned char* data = reinterpret_cast<const unsigned char*>(frame[kData]);
  const long long height = frame[kHeight], width = frame[kWidth];
  const long long out_height = frame[kOutHeight], out_width = frame[kOutWidth];
  const long long grid_width = out_width / p;
  const long long patch_in_frame = block - frame[kFirstBlock];
  const long long patch_row = patch_in_frame / grid_width, patch_col = patch_in_frame % grid_width;

  const bool vertical_first = nm::vertical_first(height, width, out_height, out_width);
  const Axis rows{height, out_height, patch_row * p};
  const Axis cols{width, out_width, patch_col * p};
  const Axis a = vertical_first ? rows : cols, b = vertical_first ? cols : rows;

  const int tid = threadIdx.x, threads = blockDim.x;
  for (int i = tid; i < 768; i += threads) {
    const int c = i / 256;  // selects, not an indexed array: an array would live in local memory
    lut[i] = nm::normalize(i % 256, c == 0 ? mean0 : c == 1 ? mean1 : mean2, c == 0 ? std0 : c == 1 ? std1 : std2);
  }
  for (int i = tid; i < 2 * p; i += threads) {
    if (i < p) load_window(a, filter, i, ksize, first_a, count_a, weights_a);
    else load_window(b, filter, i - p, ksize, first_b, count_b, weights_b);
  }
  __syncthreads();

  // This thread's output pixel (ty, tx) of the patch, and its positions along A and B.
  const int ty = tid / p, tx = tid % p;
  const int ia = vertical_first ? ty : tx, jb = vertical_first ? tx : ty;
  const nm::Span span_a = nm::window_span(first_a, count_a, p), span_b = nm::window_span(first_b, count_b, p);
  const long long a_begin = span_a.begin, a_len = span_a.end - span_a.begin, b_end = span_b.end;
  const long long stride_h = frame[kStrideH], stride_w = frame[kStrideW], stride_c = frame[kStrideC];
  const int row_len = 3 * p;  // one B position of the intermediate: p positions along A x 3 channels
  int acc[3] = {nm::kHalf, nm::kHalf, nm::kHalf};
  const int own_first = first_b[jb], own_end = first_b[jb] + count_b[jb];
  for (long long c0 = span_b.begin; c0 < b_end; c0 += chunk) {
    const long long c1 = min(c0 + chunk, b_end);
    // Stage the frame's rows x cols rectangle this chunk reads: B positions [c0, c1) x span_a.
    const long long row0 = vertical_first ? a_begin : c0, col0 = vertical_first ? c0 : a_begin;
    const unsigned char* origin = data + row0 * stride_h + col0 * stride_w;
    const nm::StagedTile tile = nm::staged_tile(reinterpret_cast<unsigned long long>(origin), stride_h, stride_w,
                                                stride_c, vertical_first ? a_len : c1 - c0,
                                                vertical_first ? c1 - c0 : a_len);
    const long long steps = nm::stage_steps(tile);
    for (long long step = tid; step < steps; step += threads) nm::stage_step(tile, origin, staged, step);
    __syncthreads();
    // First pass, out of the tile: intermediate[(pos_b - c0), i, channel] for every pos_b of the chunk.
    const long long a_step = vertical_first ? tile.pitch : tile.pixel_stride;
    for (int e = tid; e < (c1 - c0) * p; e += threads) {
      const int b_rel = e / p, i = e % p;
      const int a_rel = first_a[i] - static_cast<int>(a_begin);
      const unsigned char* src = staged + (vertical_first ? nm::tile_offset(tile, a_rel, b_rel, 0)
                                                          : nm::tile_offset(tile, b_rel, a_rel, 0));
      for (int c = 0; c < 3; ++c) {
        inter[e * 3 + c] = nm::resample_value(src + c * tile.channel_stride, a_step, weights_a + i * ksize, count_a[i]);
      }
    }
    __syncthreads();
    // Second pass: the taps of this thread's B window that fall in the chunk.
    const long long t_begin = max(static_cast<long long>(own_first), c0), t_end = min(static_cast<long long>(own_end), c1);
    if (t_begin < t_end) {
      const unsigned char* src = inter + (t_begin - c0) * row_len + ia * 3;
      const int* w = weights_b + jb * ksize + (t_begin - own_first);
      for (int c = 0; c < 3; ++c) acc[c] = nm::accumulate(acc[c], src + c, row_len, w, static_cast<int>(t_end - t_begin));
    }
    __syncthreads();
  }

  const nm::PatchLayout layout{p, temporal_patch_size, merge_size, channel_major != 0};
  const long long patch = frame[kFirstPatch] + nm::patch_index(layout, patch_row, patch_col, grid_width);
  float* out = patches + patch * nm::patch_dim(layout);
  const long long t_slot = frame[kTSlot];
  for (int c = 0; c < 3; ++c) out[nm::value_offset(layout, ty, tx, c, t_slot)] = lut[256 * c + nm::clip8(acc[c])];
  if (tid == 0 && t_slot == 0) {
    int* ids = position_ids + id_width * patch;
    if (id_width == 3) *ids++ = static_cast<int>(frame[kTGroup]);
    ids[0] = static_cast<int>(patch_row);
    ids[1] = static_cast<int>(patch_col);
  }
}
