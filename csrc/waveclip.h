// Shared declarations of the waveclip extension: stage geometry, colour matrices, host-side
// validation and the entry points of the CPU kernels (the CUDA launchers are in cuda_kernels.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace waveclip {

// The op contracts of waveclip_kernels/common.py, mirrored for the kernels: the colour matrix and the
// stage geometry. tests/kernels/test_tokenizer_backends.py checks, through the `color_matrix` and
// `stage_geometry` bindings, that the two agree.

// BT.601 luma/chroma matrix without offsets (rows give Y, Cb, Cr from R, G, B).
constexpr double kYCbCrFromRGB[3][3] = {
    {0.299, 0.587, 0.114},
    {-0.168736, -0.331264, 0.5},
    {0.5, -0.418688, -0.081312},
};

// The 3x3 colour matrix to apply (identity for "rgb"), its inverse when `inverse`.
void color_matrix(bool ycbcr, bool inverse, double m[3][3]);

// Where every stage's tokens come from. One grid cell of the image is (ph0 << levels) x (pw0 << levels)
// pixels; its pyramid is self-contained, so a cell is the natural unit of work.
struct Geometry {
  int64_t batch, height, width, levels, grid_h, grid_w;
  int64_t ph0, pw0;  // stage-0 patch (A_L pixels per cell)

  Geometry(int64_t B, int64_t H, int64_t W, int64_t L, int64_t gh, int64_t gw)
      : batch(B), height(H), width(W), levels(L), grid_h(gh), grid_w(gw), ph0((H >> L) / gh), pw0((W >> L) / gw) {}
  int64_t cells() const { return grid_h * grid_w; }
  int64_t cell_h() const { return ph0 << levels; }
  int64_t cell_w() const { return pw0 << levels; }
  // Stage s >= 1 holds the detail bands of level L-s+1, whose patches are (ph0, pw0) << (s-1).
  int64_t patch_h(int64_t s) const { return s == 0 ? ph0 : ph0 << (s - 1); }
  int64_t patch_w(int64_t s) const { return s == 0 ? pw0 : pw0 << (s - 1); }
  int64_t channels(int64_t s) const { return s == 0 ? 3 : 9; }
  int64_t dim(int64_t s) const { return channels(s) * patch_h(s) * patch_w(s); }
};

// ------------------------------------------------------------------------------ validation

// True for float16, bfloat16, float32 and float64.
bool is_float_type(at::ScalarType t);

// Checks every tokenizer argument; returns whether the colour is "ycbcr".
bool check_tokenize(const at::Tensor& images, int64_t levels, int64_t grid_h, int64_t grid_w,
                    const std::string& color, at::ScalarType out_dtype);

// Checks every detokenizer argument; returns whether the colour is "ycbcr".
bool check_detokenize(const std::vector<at::Tensor>& tokens, int64_t levels, int64_t grid_h, int64_t grid_w,
                      const std::string& color, int64_t height, int64_t width);

// Filled length and cache row of every query row, read to the host after validation.
struct AppendPlan {
  std::vector<int64_t> lens;
  std::vector<int64_t> rows;
};

// Checks every argument of attention_with_kv_append (shapes, dtypes, devices, overflow, duplicate
// rows) before anything is written.
AppendPlan check_kv_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                           const std::optional<at::Tensor>& batch_index);

// The shape, dtype and device checks of check_kv_append alone.
void check_kv_append_tensors(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                             const at::Tensor& k_cache, const at::Tensor& v_cache);

// Refuses caches that overlap themselves or each other, and inputs that overlap a cache (checked on
// addresses, before anything is written).
void check_kv_memory(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache);

// The memory-safety checks of an already validated plan: one entry per query row, every row inside the
// cache, every append inside N_max. O(B) on the host; duplicates are not searched again.
void check_plan_bounds(const AppendPlan& plan, const at::Tensor& q, const at::Tensor& k_cache);

// ------------------------------------------------------------------------------ CPU kernels

// images: (B, 3, H, W) any strides -> L+1 contiguous (B, Gh*Gw, dim_s) tensors of out_dtype.
std::vector<at::Tensor> wavelet_tokenize_cpu(const at::Tensor& images, const Geometry& g, bool ycbcr,
                                             at::ScalarType out_dtype);

// Which CPU tokenizer kernel these images take: "avx512" (float32 in and out, unit-stride rows, at least
// one level, level-1 patches a multiple of 16 wide, later patches that tile into vectors of 16, a CPU
// with AVX-512F), "avx512-stream" (the same with non-temporal token stores, for outputs over 1 MiB) or
// "generic".
std::string cpu_tokenizer_kernel(const at::Tensor& images, const Geometry& g, at::ScalarType out_dtype);

// tokens: L+1 (B, Gh*Gw, dim_s) tensors, any strides -> contiguous (B, 3, H, W) of their dtype.
at::Tensor wavelet_detokenize_cpu(const std::vector<at::Tensor>& tokens, const Geometry& g, bool ycbcr);

// Copies k_new/v_new (B, H, n, D) into k_cache/v_cache (B_cache, H, N_max, D) at [lens[b], lens[b]+n)
// of row rows[b].
void kv_scatter_cpu(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const AppendPlan& plan);

// Whether the CPU attention kernels can run (they call the BLAS of the torch they are loaded into).
bool cpu_attention_available();

// q, k, v: (B, H, N, D) of one dtype, head dim unit-stride or not; block_sizes partitions N. Returns a
// contiguous (B, H, N, D) in q's dtype: a query of block i attends the keys of blocks <= i. With with_lse,
// also each row's log-sum-exp of the scaled scores, contiguous (B, H, N) in the compute dtype (float64 for
// float64 inputs, else float32); without, an empty tensor.
std::tuple<at::Tensor, at::Tensor> block_causal_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::vector<int64_t>& block_sizes, double scale,
                                                              bool with_lse);

// q: (B, H, n, D) attends [0, plan.lens[b] + n) of cache row plan.rows[b] (already written). Returns a
// contiguous (B, H, n, D) in q's dtype.
at::Tensor attend_prefixes_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const AppendPlan& plan, double scale);


}  // namespace waveclip
