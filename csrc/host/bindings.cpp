// Python bindings of the host kernels (module glm5v_kernels._host). Arguments are validated here
// as well as in Python, since these functions write through raw pointers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "naflex.h"
#include "partition.h"
#include "parallel.h"

namespace py = pybind11;
using namespace glm5v;

namespace {

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

template <typename T>
void require_array(const py::array& a, const char* name, std::vector<py::ssize_t> shape, bool writable) {
  require(py::isinstance<py::array_t<T>>(a) && a.dtype().is(py::dtype::of<T>()),
          std::string(name) + " has the wrong dtype");
  require(a.ndim() == static_cast<py::ssize_t>(shape.size()), std::string(name) + " has the wrong number of dims");
  for (size_t d = 0; d < shape.size(); ++d) {
    require(shape[d] < 0 || a.shape(d) == shape[d], std::string(name) + " has the wrong shape");
  }
  require(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
  require(!writable || a.writeable(), std::string(name) + " must be writable");
}

// A fresh output buffer of tens of MB is mostly page faults to write; asking for transparent huge
// pages on its 2 MiB-aligned interior makes that 512 times fewer faults. Advice only: ignored where
// THP is off.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

py::array_t<int64_t> naflex_target_sizes(const py::array& sizes, int64_t patch_size, int64_t merge_size,
                                         int64_t max_num_patches) {
  require_array<int64_t>(sizes, "sizes", {-1, 2}, false);
  require(patch_size >= 1 && merge_size >= 1, "patch_size and merge_size must be >= 1");
  require(max_num_patches >= merge_size * merge_size, "max_num_patches must be >= merge_size ** 2");
  const auto n = sizes.shape(0);
  py::array_t<int64_t> out({n, static_cast<py::ssize_t>(2)});
  const int64_t* in = static_cast<const int64_t*>(sizes.data());
  int64_t* result = out.mutable_data();
  for (py::ssize_t i = 0; i < n; ++i) {
    require(in[2 * i] >= 1 && in[2 * i + 1] >= 1, "image sizes must be >= 1");
    const naflex::Size s = naflex::target_size(in[2 * i], in[2 * i + 1], patch_size, merge_size, max_num_patches);
    result[2 * i] = s.height;
    result[2 * i + 1] = s.width;
  }
  return out;
}

// Views of images[i] (uint8 (H, W, C) arrays) and their targets, checked against patch_size.
void frame_views(const py::list& images, const py::array& targets, int64_t patch_size,
                 std::vector<naflex::ImageView>& views, std::vector<naflex::Size>& sizes) {
  const auto n = static_cast<py::ssize_t>(images.size());
  require(patch_size >= 1, "patch_size must be >= 1");
  require_array<int64_t>(targets, "targets", {n, 2}, false);
  const int64_t* target_data = static_cast<const int64_t*>(targets.data());
  views.resize(n);
  sizes.resize(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    const py::array image = py::reinterpret_borrow<py::array>(images[i]);
    require(py::isinstance<py::array_t<uint8_t>>(images[i]) && image.dtype().is(py::dtype::of<uint8_t>()) &&
                image.ndim() == 3,
            "images[" + std::to_string(i) + "] must be a uint8 array of shape (height, width, channels)");
    const int64_t channels = image.shape(2);
    require(channels == 1 || channels == 3 || channels == 4,
            "images[" + std::to_string(i) + "] must have 1, 3 or 4 channels");
    require(image.shape(0) >= 1 && image.shape(1) >= 1, "images[" + std::to_string(i) + "] is empty");
    views[i] = {static_cast<const uint8_t*>(image.data()), image.shape(0), image.shape(1), channels,
                image.strides(0), image.strides(1), image.strides(2)};
    sizes[i] = {target_data[2 * i], target_data[2 * i + 1]};
    require(sizes[i].height >= patch_size && sizes[i].width >= patch_size && sizes[i].height % patch_size == 0 &&
                sizes[i].width % patch_size == 0,
            "targets[" + std::to_string(i) + "] must be positive multiples of patch_size");
  }
}

// Checks the packed outputs and runs naflex::pack with the GIL released.
void run_pack(const std::vector<naflex::ImageView>& views, const std::vector<naflex::Size>& sizes,
              const std::vector<naflex::FrameSlot>& slots, const naflex_math::PatchLayout& layout, py::ssize_t total,
              const py::array& mean, const py::array& std, const std::string& resample, py::array& patches,
              py::array& position_ids, int id_width, int num_threads) {
  require_array<float>(mean, "mean", {3}, false);
  require_array<float>(std, "std", {3}, false);
  const naflex::Filter filter = naflex::parse_filter(resample);
  require_array<float>(patches, "patches", {total, naflex_math::patch_dim(layout)}, true);
  require_array<int32_t>(position_ids, "position_ids", {total, id_width}, true);
  float* patch_data = static_cast<float*>(patches.mutable_data());
  int32_t* id_data = static_cast<int32_t*>(position_ids.mutable_data());

  advise_huge_pages(patch_data, static_cast<size_t>(patches.nbytes()));

  // The caller's list keeps every image alive; nothing below touches Python objects.
  py::gil_scoped_release release;
  naflex::pack(views, sizes, slots, layout, static_cast<const float*>(mean.data()),
               static_cast<const float*>(std.data()), filter, patch_data, id_data, id_width,
               num_threads > 0 ? num_threads : default_num_threads());
}

void naflex_pack(const py::list& images, const py::array& targets, const py::array& cu_seqlens,
                 const py::array& mean, const py::array& std, int64_t patch_size, const std::string& resample,
                 py::array& patches, py::array& position_ids, int num_threads) {
  const auto n = static_cast<py::ssize_t>(images.size());
  std::vector<naflex::ImageView> views;
  std::vector<naflex::Size> sizes;
  frame_views(images, targets, patch_size, views, sizes);
  require_array<int32_t>(cu_seqlens, "cu_seqlens", {n + 1}, false);
  const int32_t* cu = static_cast<const int32_t*>(cu_seqlens.data());
  require(cu[0] == 0, "cu_seqlens[0] must be 0");
  std::vector<naflex::FrameSlot> slots(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    require(cu[i + 1] - cu[i] == (sizes[i].height / patch_size) * (sizes[i].width / patch_size),
            "cu_seqlens does not match the patch grids of targets at image " + std::to_string(i));
    slots[i] = {cu[i], 0, 0};
  }
  run_pack(views, sizes, slots, {patch_size, 1, 1, false}, cu[n], mean, std, resample, patches, position_ids, 2,
           num_threads);
}

void naflex_pack_video(const py::list& frames, const py::array& targets, const py::array& slots,
                       const py::array& mean, const py::array& std, int64_t patch_size,
                       int64_t temporal_patch_size, int64_t merge_size, const std::string& resample,
                       py::array& patches, py::array& position_ids, int num_threads) {
  const auto n = static_cast<py::ssize_t>(frames.size());
  std::vector<naflex::ImageView> views;
  std::vector<naflex::Size> sizes;
  frame_views(frames, targets, patch_size, views, sizes);
  require(temporal_patch_size >= 1 && merge_size >= 1, "temporal_patch_size and merge_size must be >= 1");
  require_array<int64_t>(slots, "slots", {n, 3}, false);
  require(patches.ndim() == 2, "patches must be 2-D");
  const py::ssize_t total = patches.shape(0);
  const int64_t* slot_data = static_cast<const int64_t*>(slots.data());
  std::vector<naflex::FrameSlot> frame_slots(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    const naflex::FrameSlot s{slot_data[3 * i], slot_data[3 * i + 1], slot_data[3 * i + 2]};
    const int64_t grid_height = sizes[i].height / patch_size, grid_width = sizes[i].width / patch_size;
    require(grid_height % merge_size == 0 && grid_width % merge_size == 0,
            "targets[" + std::to_string(i) + "] must be multiples of patch_size * merge_size");
    require(s.first_patch >= 0 && s.first_patch + grid_height * grid_width <= total && s.t_slot >= 0 &&
                s.t_slot < temporal_patch_size,
            "slots[" + std::to_string(i) + "] lies outside patches or the temporal group");
    frame_slots[i] = s;
  }
  run_pack(views, sizes, frame_slots, {patch_size, temporal_patch_size, merge_size, true}, total, mean, std,
           resample, patches, position_ids, 3, num_threads);
}

py::array_t<int64_t> naflex_kernel_sizes(const py::array& sizes, const std::string& resample) {
  require_array<int64_t>(sizes, "sizes", {-1, 2}, false);
  const int filter = static_cast<int>(naflex::parse_filter(resample));
  const auto n = sizes.shape(0);
  py::array_t<int64_t> out(n);
  const int64_t* in = static_cast<const int64_t*>(sizes.data());
  for (py::ssize_t i = 0; i < n; ++i) {
    require(in[2 * i] >= 1 && in[2 * i + 1] >= 1, "sizes must be >= 1");
    out.mutable_data()[i] = in[2 * i] == in[2 * i + 1] ? 1 : naflex_math::kernel_size(in[2 * i], in[2 * i + 1], filter);
  }
  return out;
}

// Shared-memory bytes of the GPU kernel's largest staged tile for each frame and chunk: frames (n, 7)
// int64 (height, width, out_height, out_width, stride_h, stride_w, stride_c), chunks (m,) int64.
py::array_t<int64_t> naflex_staged_tile_bytes(const py::array& frames, int64_t patch_size, const std::string& resample,
                                              const py::array& chunks) {
  require_array<int64_t>(frames, "frames", {-1, 7}, false);
  require_array<int64_t>(chunks, "chunks", {-1}, false);
  require(patch_size >= 1, "patch_size must be >= 1");
  const naflex::Filter filter = naflex::parse_filter(resample);
  const auto n = frames.shape(0), m = chunks.shape(0);
  const int64_t* f = static_cast<const int64_t*>(frames.data());
  const int64_t* chunk = static_cast<const int64_t*>(chunks.data());
  py::array_t<int64_t> out({n, m});
  for (py::ssize_t i = 0; i < n; ++i, f += 7) {
    require(f[0] >= 1 && f[1] >= 1 && f[2] >= patch_size && f[3] >= patch_size && f[2] % patch_size == 0 &&
                f[3] % patch_size == 0,
            "frames[" + std::to_string(i) + "]: sizes must be >= 1, resized sizes multiples of patch_size");
    require(f[4] >= 0 && f[5] >= 0 && f[6] >= 0, "frames[" + std::to_string(i) + "]: strides must be >= 0");
    const bool vertical_first = naflex_math::vertical_first(f[0], f[1], f[2], f[3]);
    const int64_t span_rows = naflex::widest_patch_span(f[0], f[2], patch_size, filter);
    const int64_t span_cols = naflex::widest_patch_span(f[1], f[3], patch_size, filter);
    for (py::ssize_t j = 0; j < m; ++j) {
      require(chunk[j] >= 1, "chunks must be >= 1");
      // A chunk spans at most `chunk` positions along B, the patch's window span along A.
      const int64_t rows = vertical_first ? span_rows : std::min(chunk[j], span_rows);
      const int64_t cols = vertical_first ? std::min(chunk[j], span_cols) : span_cols;
      out.mutable_at(i, j) = naflex_math::tile_bytes(naflex_math::staged_tile(0, f[4], f[5], f[6], rows, cols));
    }
  }
  return out;
}

// Runs the GPU kernel's staging of one tile on the CPU: the rows x cols rectangle of pixels at
// buffer[offset + y * stride_h + x * stride_w + c * stride_c] (c < 3, or c = 0 with stride_c 0) into a
// 16-byte aligned tile filled with `poison` first. Returns the tile's layout and the (rows, cols, 3)
// values read back from the tile at naflex_math::tile_offset (grey repeated).
py::tuple naflex_stage_tile(const py::array& buffer, int64_t offset, int64_t stride_h, int64_t stride_w,
                            int64_t stride_c, int64_t rows, int64_t cols, int poison) {
  require_array<uint8_t>(buffer, "buffer", {-1}, false);
  require(offset >= 0 && stride_h >= 0 && stride_w >= 0 && stride_c >= 0 && rows >= 0 && cols >= 0,
          "offset, strides, rows and cols must be >= 0");
  const int64_t channels = stride_c != 0 ? 3 : 1;
  if (rows > 0 && cols > 0) {
    const int64_t last = offset + (rows - 1) * stride_h + (cols - 1) * stride_w + (channels - 1) * stride_c;
    require(last < buffer.shape(0), "the rectangle reaches past the end of buffer");
  }
  const uint8_t* src = static_cast<const uint8_t*>(buffer.data()) + offset;
  const naflex_math::StagedTile t =
      naflex_math::staged_tile(reinterpret_cast<uint64_t>(src), stride_h, stride_w, stride_c, rows, cols);
  require(naflex_math::tile_bytes(t) <= (int64_t(1) << 26), "the tile is far larger than shared memory");
  std::vector<uint8_t> storage(static_cast<size_t>(naflex_math::tile_bytes(t) + naflex_math::kVectorBytes),
                               static_cast<uint8_t>(poison));
  const uintptr_t base = reinterpret_cast<uintptr_t>(storage.data());
  uint8_t* tile = storage.data() + (naflex_math::kVectorBytes - base % naflex_math::kVectorBytes) %
                                       naflex_math::kVectorBytes;
  const int64_t steps = naflex_math::stage_steps(t);
  for (int64_t step = 0; step < steps; ++step) naflex_math::stage_step(t, src, tile, step);
  py::array_t<uint8_t> values({rows, cols, int64_t(3)});
  for (int64_t y = 0; y < rows; ++y) {
    for (int64_t x = 0; x < cols; ++x) {
      for (int64_t c = 0; c < 3; ++c) values.mutable_at(y, x, c) = tile[naflex_math::tile_offset(t, y, x, c)];
    }
  }
  py::dict layout;
  layout["raw"] = t.raw;
  layout["vectorised"] = t.vectorised;
  layout["row_bytes"] = t.row_bytes;
  layout["pitch"] = t.pitch;
  layout["lead"] = t.lead;
  layout["head"] = t.split.head;
  layout["words"] = t.split.words;
  layout["tail"] = t.split.tail;
  layout["steps"] = steps;
  layout["tile_address"] = reinterpret_cast<uint64_t>(tile);
  return py::make_tuple(layout, values);
}

const double* optional_vector(const py::object& value, py::ssize_t length, const char* name) {
  if (value.is_none()) return nullptr;
  const py::array array = py::reinterpret_borrow<py::array>(value);
  require_array<double>(array, name, {length}, false);
  return static_cast<const double*>(array.data());
}

py::array_t<int32_t> balanced_partition(const py::array& costs, int64_t k, const py::object& weights,
                                        const py::object& caps, bool equal_size, const py::object& groups,
                                        const std::string& method) {
  require_array<double>(costs, "costs", {-1, -1}, false);
  const auto n = costs.shape(0), m = costs.shape(1);
  require(k >= 1, "k must be >= 1");
  partition::Problem problem{static_cast<const double*>(costs.data()), n, m, k,
                             optional_vector(weights, m, "weights"), optional_vector(caps, m, "caps"), equal_size,
                             nullptr};
  if (!groups.is_none()) {
    const py::array array = py::reinterpret_borrow<py::array>(groups);
    require_array<int64_t>(array, "groups", {n}, false);
    problem.groups = static_cast<const int64_t*>(array.data());
  }
  const partition::Method parsed = partition::parse_method(method);
  std::vector<int32_t> parts;
  {
    py::gil_scoped_release release;
    parts = partition::balanced_partition(problem, parsed);
  }
  py::array_t<int32_t> out(n);
  std::copy(parts.begin(), parts.end(), out.mutable_data());
  return out;
}

py::array_t<int64_t> partition_contiguous(const py::array& costs, int64_t k) {
  require_array<double>(costs, "costs", {-1}, false);
  require(k >= 1, "k must be >= 1");
  const std::vector<int64_t> bounds =
      partition::partition_contiguous(static_cast<const double*>(costs.data()), costs.shape(0), k);
  py::array_t<int64_t> out(static_cast<py::ssize_t>(bounds.size()));
  std::copy(bounds.begin(), bounds.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_host, m) {
  m.doc() = "glm5v host kernels (C++): NaFlex packing, multi-key balanced partitioning";
  m.def("balanced_partition", &balanced_partition, py::arg("costs"), py::arg("k"), py::arg("weights"),
        py::arg("caps"), py::arg("equal_size"), py::arg("groups"), py::arg("method"),
        "(n, m) float64 costs -> (n,) int32 part of every sample.");
  m.def("partition_contiguous", &partition_contiguous, py::arg("costs"), py::arg("k"),
        "(n,) float64 costs -> (k + 1,) int64 boundaries of k contiguous ranges minimising the largest sum.");
  m.def("default_num_threads", &default_num_threads, "Threads used when num_threads <= 0.");
  m.def(
      "naflex_kernel",
      [](const std::optional<std::string>& name) {
        if (name) naflex::select_horizontal_kernel(*name);
        return naflex::selected_horizontal_kernel();
      },
      py::arg("name") = py::none(),
      "The horizontal resampling kernel in use; with a name ('avx512', 'avx2', 'scalar'), select it first.");
  m.def("naflex_supported_kernels", &naflex::supported_horizontal_kernels,
        "Horizontal resampling kernels this CPU runs, fastest first.");
  m.def("naflex_target_sizes", &naflex_target_sizes, py::arg("sizes"), py::arg("patch_size"),
        py::arg("merge_size"), py::arg("max_num_patches"),
        "(n, 2) int64 (height, width) -> (n, 2) int64 resized (height, width) fitting the patch budget.");
  m.def("naflex_pack", &naflex_pack, py::arg("images"), py::arg("targets"), py::arg("cu_seqlens"),
        py::arg("mean"), py::arg("std"), py::arg("patch_size"), py::arg("resample"), py::arg("patches"), py::arg("position_ids"),
        py::arg("num_threads"),
        "Resizes, normalises and patchifies uint8 (H, W, C) images into preallocated packed buffers.");
  m.def("naflex_pack_video", &naflex_pack_video, py::arg("frames"), py::arg("targets"), py::arg("slots"),
        py::arg("mean"), py::arg("std"), py::arg("patch_size"), py::arg("temporal_patch_size"),
        py::arg("merge_size"), py::arg("resample"), py::arg("patches"), py::arg("position_ids"),
        py::arg("num_threads"),
        "Video frames into (patches, 3 * T * p * p) float32 channel-major temporal patches; slots (n, 3) int64 "
        "holds (first patch of the frame's group, slot in the group, group index) per frame.");
  m.def("naflex_kernel_sizes", &naflex_kernel_sizes, py::arg("sizes"), py::arg("resample"),
        "(n, 2) int64 (in_size, out_size) -> (n,) int64 taps of the widest resampling window (1: not resized).");
  m.def("naflex_staged_tile_bytes", &naflex_staged_tile_bytes, py::arg("frames"), py::arg("patch_size"),
        py::arg("resample"), py::arg("chunks"),
        "(n, 7) int64 (height, width, out_height, out_width, stride_h, stride_w, stride_c) and (m,) int64 chunks "
        "-> (n, m) int64 shared-memory bytes of the CUDA kernel's largest staged input tile.");
  m.def("naflex_stage_tile", &naflex_stage_tile, py::arg("buffer"), py::arg("offset"), py::arg("stride_h"),
        py::arg("stride_w"), py::arg("stride_c"), py::arg("rows"), py::arg("cols"), py::arg("poison"),
        "The CUDA kernel's staging of a rows x cols pixel rectangle of a uint8 buffer, run on the CPU: "
        "(layout dict, (rows, cols, 3) uint8 values read back from the tile).");
}
