// Launchers of the CUDA kernels (csrc/ops_cuda.cu), with plain pointers and strides so that the
// .cu file needs no ATen headers. All strides and sizes are in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace waveclip::cuda {

constexpr int kMaxStages = 16;  // levels + 1

enum class Dtype : int { kHalf, kBFloat16, kFloat, kDouble };

struct TokenizeParams {
  const void* images;  // (B, 3, H, W), strides s_b, s_c, s_h, s_w
  int64_t s_b, s_c, s_h, s_w;
  void* tokens[kMaxStages];  // stage s: (B, Gh*Gw, dim_s) contiguous
  double m[3][3];            // colour matrix
  int64_t grid_h, grid_w, ph0, pw0;
  int levels, mix;
  int64_t tile_h, tile_w;  // set by the launcher: sub-tile in stage-0 pixels
  int vec_load;            // set by the launcher: the images allow 16-byte loads
  unsigned vec_store;      // set by the launcher: bit s, stage s allows 16-byte stores
};

struct DetokenizeParams {
  const void* tokens[kMaxStages];  // stage s: (B, Gh*Gw, dim_s), strides s_b[s], s_g[s], s_f[s]
  int64_t s_b[kMaxStages], s_g[kMaxStages], s_f[kMaxStages];
  void* image;  // (B, 3, H, W) contiguous
  int64_t height, width;
  double m[3][3];  // inverse colour matrix
  int64_t grid_h, grid_w, ph0, pw0;
  int levels, mix;
  int64_t tile_h, tile_w;  // set by the launcher
  unsigned vec_load;       // set by the launcher: bit s, stage s allows 16-byte loads
  int vec_store;           // set by the launcher: the image allows 16-byte stores
};

struct ScatterSide {
  const char* src;  // (B, H, n, D), strides s[0..3]
  char* dst;        // (B_cache, H, N_max, D), strides d[0..3]
  int64_t s[4], d[4];
};

// Tokenizer: `out` is the input dtype or its compute dtype (float, or double for double).
void tokenize(const TokenizeParams& p, Dtype in, Dtype out, int64_t batch, cudaStream_t stream);

// Inverse: the image has the tokens' dtype.
void detokenize(const DetokenizeParams& p, Dtype dtype, int64_t batch, cudaStream_t stream);

// k.src/v.src rows (b, h, t) -> k.dst/v.dst rows (rows[b], h, lens[b] + t); lens and rows are (B,)
// int64 device arrays.
void kv_scatter(const ScatterSide& k, const ScatterSide& v, const int64_t* lens, const int64_t* rows, int64_t batch,
                int64_t heads, int64_t n, int64_t D, int64_t elem_size, cudaStream_t stream);

}  // namespace waveclip::cuda
