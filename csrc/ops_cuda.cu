// CUDA kernels: the fused wavelet tokenizer, its inverse, and the KV-cache append scatter.
//
// Tokenizer: one thread block per sub-tile of a grid cell, a (tile_h << L) x (tile_w << L) pixel
// rectangle whose Haar pyramid is self-contained. The block reads its pixels once (16-byte loads
// where the strides allow), applies the colour transform on the way into shared memory, runs all L
// levels there and writes every stage's tokens once (16-byte stores where the token layout allows).
// The inverse mirrors it. The KV scatter copies k_new/v_new rows into the caches, 16 bytes at a time
// when rows are contiguous and aligned, element by element otherwise.
#include "waveclip.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

namespace waveclip {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxStages = 16;
constexpr int64_t kDefaultSmem = 48 * 1024;

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// N elements moved as one aligned access (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int vec16 = 16 / static_cast<int>(sizeof(T));

struct TokenizeParams {
  const void* images;  // (B, 3, H, W), element strides s_b, s_c, s_h, s_w
  int64_t s_b, s_c, s_h, s_w;
  void* tokens[kMaxStages];  // stage s: (B, Gh*Gw, dim_s) contiguous
  double m[3][3];            // colour matrix
  int64_t grid_h, grid_w, ph0, pw0;
  int64_t tile_h, tile_w;  // sub-tile in stage-0 pixels; divide ph0, pw0
  int levels, mix;
  int vec_load;       // the images allow 16-byte loads
  unsigned vec_store;  // bit s: stage s allows 16-byte stores
};

struct DetokenizeParams {
  const void* tokens[kMaxStages];  // stage s: (B, Gh*Gw, dim_s), element strides s_b[s], s_g[s], s_f[s]
  int64_t s_b[kMaxStages], s_g[kMaxStages], s_f[kMaxStages];
  void* image;  // (B, 3, H, W) contiguous
  int64_t height, width;
  double m[3][3];  // inverse colour matrix
  int64_t grid_h, grid_w, ph0, pw0;
  int64_t tile_h, tile_w;
  int levels, mix;
  unsigned vec_load;  // bit s: stage s allows 16-byte loads
  int vec_store;      // the image allows 16-byte stores
};

// Block -> (batch b, cell, sub-tile row ty, sub-tile column tx).
struct TileIndex {
  int64_t b, cell, gy, gx, ty, tx;
  __device__ TileIndex(int64_t id, int64_t grid_h, int64_t grid_w, int64_t tiles_y, int64_t tiles_x) {
    tx = id % tiles_x;
    id /= tiles_x;
    ty = id % tiles_y;
    id /= tiles_y;
    cell = id % (grid_h * grid_w);
    b = id / (grid_h * grid_w);
    gy = cell / grid_w;
    gx = cell % grid_w;
  }
};

// ------------------------------------------------------------------------------ tokenizer

// Reads the sub-tile's pixels (V per access) and writes the colour-mixed tile X (3, Ht, Wt).
template <int V, typename in_t, typename acc_t>
__device__ void load_tile(const in_t* __restrict img, const TokenizeParams& p, int64_t Ht, int64_t Wt,
                          const acc_t (&m)[3][3], acc_t* __restrict X) {
  const int64_t groups = Wt / V;
  for (int64_t it = threadIdx.x; it < Ht * groups; it += blockDim.x) {
    const int64_t y = it / groups, j0 = (it % groups) * V;
    const in_t* px = img + y * p.s_h + j0 * p.s_w;
    Pack<in_t, V> ch[3];
    for (int c = 0; c < 3; ++c) {
      if constexpr (V > 1) {
        ch[c] = *reinterpret_cast<const Pack<in_t, V>*>(px + c * p.s_c);
      } else {
        ch[c].v[0] = px[c * p.s_c];
      }
    }
    acc_t* o = X + y * Wt + j0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t x0 = static_cast<acc_t>(ch[0].v[k]), x1 = static_cast<acc_t>(ch[1].v[k]);
      const acc_t x2 = static_cast<acc_t>(ch[2].v[k]);
      if (p.mix) {
        o[k] = (m[0][0] * x0 + m[0][1] * x1) + m[0][2] * x2;
        o[Ht * Wt + k] = (m[1][0] * x0 + m[1][1] * x1) + m[1][2] * x2;
        o[2 * Ht * Wt + k] = (m[2][0] * x0 + m[2][1] * x1) + m[2][2] * x2;
      } else {
        o[k] = x0;
        o[Ht * Wt + k] = x1;
        o[2 * Ht * Wt + k] = x2;
      }
    }
  }
}

// One analysis level: src (3, 2*h2, 2*w2) -> dst A (3, h2, w2) in shared memory, detail bands
// straight to the stage's token: band (c, k) at tok + (3c+k)*band_n + i*pw + j, V columns per item.
template <int V, typename acc_t, typename out_t>
__device__ void analysis_level(const acc_t* __restrict src, acc_t* __restrict dst, int64_t h2, int64_t w2,
                               out_t* __restrict tok, int64_t band_n, int64_t pw) {
  const int64_t groups = w2 / V;
  const acc_t half = acc_t(0.5);
  for (int64_t it = threadIdx.x; it < 3 * h2 * groups; it += blockDim.x) {
    const int64_t j0 = (it % groups) * V, i = (it / groups) % h2, c = it / (groups * h2);
    const acc_t* r0 = src + (c * 2 * h2 + 2 * i) * (2 * w2) + 2 * j0;
    const acc_t* r1 = r0 + 2 * w2;
    Pack<out_t, V> hb, vb, db;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t a = r0[2 * k], b = r0[2 * k + 1], cc = r1[2 * k], d = r1[2 * k + 1];
      const acc_t sum = a + b, dif = a - b;
      dst[(c * h2 + i) * w2 + j0 + k] = ((sum + cc) + d) * half;
      hb.v[k] = static_cast<out_t>(((sum - cc) - d) * half);
      vb.v[k] = static_cast<out_t>(((dif + cc) - d) * half);
      db.v[k] = static_cast<out_t>(((dif - cc) + d) * half);
    }
    out_t* o = tok + 3 * c * band_n + i * pw + j0;
    *reinterpret_cast<Pack<out_t, V>*>(o) = hb;
    *reinterpret_cast<Pack<out_t, V>*>(o + band_n) = vb;
    *reinterpret_cast<Pack<out_t, V>*>(o + 2 * band_n) = db;
  }
}

// Stage 0: A_L (3, th, tw) in shared memory -> token rows at tok + c*band_n + i*pw + j.
template <int V, typename acc_t, typename out_t>
__device__ void store_approx(const acc_t* __restrict src, int64_t th, int64_t tw, out_t* __restrict tok,
                             int64_t band_n, int64_t pw) {
  const int64_t groups = tw / V;
  for (int64_t it = threadIdx.x; it < 3 * th * groups; it += blockDim.x) {
    const int64_t j0 = (it % groups) * V, i = (it / groups) % th, c = it / (groups * th);
    Pack<out_t, V> a;
#pragma unroll
    for (int k = 0; k < V; ++k) a.v[k] = static_cast<out_t>(src[(c * th + i) * tw + j0 + k]);
    *reinterpret_cast<Pack<out_t, V>*>(tok + c * band_n + i * pw + j0) = a;
  }
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) tokenize_kernel(const TokenizeParams p) {
  using acc_t = acc_of<in_t>;
  constexpr int VI = vec16<in_t>, VO = vec16<out_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int L = p.levels;
  const TileIndex t(blockIdx.x, p.grid_h, p.grid_w, p.ph0 / p.tile_h, p.pw0 / p.tile_w);
  const int64_t Ht = p.tile_h << L, Wt = p.tile_w << L, G = p.grid_h * p.grid_w;
  acc_t* X = reinterpret_cast<acc_t*>(smem);  // (3, Ht, Wt), later the even levels' A
  acc_t* P = X + 3 * Ht * Wt;                   // (3, Ht/2, Wt/2): the odd levels' A
  acc_t m[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = static_cast<acc_t>(p.m[i][k]);

  const int64_t y0 = t.gy * (p.ph0 << L) + t.ty * Ht, x0 = t.gx * (p.pw0 << L) + t.tx * Wt;
  const in_t* img = static_cast<const in_t*>(p.images) + t.b * p.s_b + y0 * p.s_h + x0 * p.s_w;
  if (p.vec_load)
    load_tile<VI>(img, p, Ht, Wt, m, X);
  else
    load_tile<1>(img, p, Ht, Wt, m, X);
  __syncthreads();

  for (int lv = 1; lv <= L; ++lv) {
    const int s = L - lv + 1;
    const int64_t h2 = p.tile_h << (L - lv), w2 = p.tile_w << (L - lv);
    const int64_t ph = p.ph0 << (L - lv), pw = p.pw0 << (L - lv), dim = 9 * ph * pw;
    out_t* tok = static_cast<out_t*>(p.tokens[s]) + (t.b * G + t.cell) * dim + t.ty * h2 * pw + t.tx * w2;
    const acc_t* src = (lv & 1) ? X : P;
    acc_t* dst = (lv & 1) ? P : X;
    if ((p.vec_store >> s) & 1u)
      analysis_level<VO>(src, dst, h2, w2, tok, ph * pw, pw);
    else
      analysis_level<1>(src, dst, h2, w2, tok, ph * pw, pw);
    __syncthreads();
  }

  const int64_t dim0 = 3 * p.ph0 * p.pw0;
  out_t* tok0 = static_cast<out_t*>(p.tokens[0]) + (t.b * G + t.cell) * dim0 + t.ty * p.tile_h * p.pw0 +
                t.tx * p.tile_w;
  const acc_t* approx = (L & 1) ? P : X;
  if (p.vec_store & 1u)
    store_approx<VO>(approx, p.tile_h, p.tile_w, tok0, p.ph0 * p.pw0, p.pw0);
  else
    store_approx<1>(approx, p.tile_h, p.tile_w, tok0, p.ph0 * p.pw0, p.pw0);
}

// ------------------------------------------------------------------------------ inverse

// Loads V consecutive features of a token as acc_t (one aligned access when V > 1).
template <int V, typename tok_t, typename acc_t>
__device__ inline void load_features(const tok_t* __restrict src, acc_t (&out)[V]) {
  if constexpr (V > 1) {
    const Pack<tok_t, V> pk = *reinterpret_cast<const Pack<tok_t, V>*>(src);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<acc_t>(pk.v[k]);
  } else {
    out[0] = static_cast<acc_t>(src[0]);
  }
}

// Stage 0 token part -> A_L (3, th, tw) in shared memory.
template <int V, typename tok_t, typename acc_t>
__device__ void load_approx(const tok_t* __restrict tok, int64_t sf, int64_t th, int64_t tw, int64_t band_n,
                            int64_t pw, acc_t* __restrict dst) {
  const int64_t groups = tw / V;
  for (int64_t it = threadIdx.x; it < 3 * th * groups; it += blockDim.x) {
    const int64_t j0 = (it % groups) * V, i = (it / groups) % th, c = it / (groups * th);
    acc_t a[V];
    load_features<V>(tok + (c * band_n + i * pw + j0) * sf, a);
#pragma unroll
    for (int k = 0; k < V; ++k) dst[(c * th + i) * tw + j0 + k] = a[k];
  }
}

// One synthesis level: A (3, h2, w2) in shared memory and the stage's bands from the token
// -> dst (3, 2*h2, 2*w2) in shared memory.
template <int V, typename tok_t, typename acc_t>
__device__ void synthesis_level(const acc_t* __restrict src, const tok_t* __restrict tok, int64_t sf, int64_t h2,
                                int64_t w2, int64_t band_n, int64_t pw, acc_t* __restrict dst) {
  const int64_t groups = w2 / V;
  const acc_t half = acc_t(0.5);
  for (int64_t it = threadIdx.x; it < 3 * h2 * groups; it += blockDim.x) {
    const int64_t j0 = (it % groups) * V, i = (it / groups) % h2, c = it / (groups * h2);
    const tok_t* f = tok + (3 * c * band_n + i * pw + j0) * sf;
    acc_t hb[V], vb[V], db[V];
    load_features<V>(f, hb);
    load_features<V>(f + band_n * sf, vb);
    load_features<V>(f + 2 * band_n * sf, db);
    acc_t* o0 = dst + (c * 2 * h2 + 2 * i) * (2 * w2) + 2 * j0;
    acc_t* o1 = o0 + 2 * w2;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t a = src[(c * h2 + i) * w2 + j0 + k];
      const acc_t sum = a + hb[k], dif = a - hb[k];
      o0[2 * k] = ((sum + vb[k]) + db[k]) * half;
      o0[2 * k + 1] = ((sum - vb[k]) - db[k]) * half;
      o1[2 * k] = ((dif + vb[k]) - db[k]) * half;
      o1[2 * k + 1] = ((dif - vb[k]) + db[k]) * half;
    }
  }
}

// X (3, Ht, Wt) in shared memory -> inverse colour -> image rows (V pixels per store).
template <int V, typename tok_t, typename acc_t>
__device__ void store_tile(const acc_t* __restrict X, int64_t Ht, int64_t Wt, const acc_t (&m)[3][3], bool mix,
                           tok_t* __restrict img, int64_t W, int64_t plane) {
  const int64_t groups = Wt / V;
  for (int64_t it = threadIdx.x; it < Ht * groups; it += blockDim.x) {
    const int64_t y = it / groups, j0 = (it % groups) * V;
    Pack<tok_t, V> out[3];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t* x = X + y * Wt + j0 + k;
      const acc_t x0 = x[0], x1 = x[Ht * Wt], x2 = x[2 * Ht * Wt];
      if (mix) {
        for (int c = 0; c < 3; ++c) out[c].v[k] = static_cast<tok_t>((m[c][0] * x0 + m[c][1] * x1) + m[c][2] * x2);
      } else {
        out[0].v[k] = static_cast<tok_t>(x0);
        out[1].v[k] = static_cast<tok_t>(x1);
        out[2].v[k] = static_cast<tok_t>(x2);
      }
    }
    for (int c = 0; c < 3; ++c) *reinterpret_cast<Pack<tok_t, V>*>(img + c * plane + y * W + j0) = out[c];
  }
}

template <typename tok_t>
__global__ void __launch_bounds__(kThreads) detokenize_kernel(const DetokenizeParams p) {
  using acc_t = acc_of<tok_t>;
  constexpr int V = vec16<tok_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int L = p.levels;
  const TileIndex t(blockIdx.x, p.grid_h, p.grid_w, p.ph0 / p.tile_h, p.pw0 / p.tile_w);
  const int64_t Ht = p.tile_h << L, Wt = p.tile_w << L;
  acc_t* X = reinterpret_cast<acc_t*>(smem);  // (3, Ht, Wt): levels with lv-1 even write here
  acc_t* P = X + 3 * Ht * Wt;                   // (3, Ht/2, Wt/2): the others
  acc_t m[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = static_cast<acc_t>(p.m[i][k]);

  acc_t* approx = (L & 1) ? P : X;
  {
    const tok_t* tok = static_cast<const tok_t*>(p.tokens[0]) + t.b * p.s_b[0] + t.cell * p.s_g[0] +
                       (t.ty * p.tile_h * p.pw0 + t.tx * p.tile_w) * p.s_f[0];
    if (p.vec_load & 1u)
      load_approx<V>(tok, p.s_f[0], p.tile_h, p.tile_w, p.ph0 * p.pw0, p.pw0, approx);
    else
      load_approx<1>(tok, p.s_f[0], p.tile_h, p.tile_w, p.ph0 * p.pw0, p.pw0, approx);
  }
  __syncthreads();
  for (int lv = L; lv >= 1; --lv) {
    const int s = L - lv + 1;
    const int64_t h2 = p.tile_h << (L - lv), w2 = p.tile_w << (L - lv);
    const int64_t ph = p.ph0 << (L - lv), pw = p.pw0 << (L - lv);
    const tok_t* tok = static_cast<const tok_t*>(p.tokens[s]) + t.b * p.s_b[s] + t.cell * p.s_g[s] +
                       (t.ty * h2 * pw + t.tx * w2) * p.s_f[s];
    acc_t* next = ((lv - 1) & 1) ? P : X;
    if ((p.vec_load >> s) & 1u)
      synthesis_level<V>(approx, tok, p.s_f[s], h2, w2, ph * pw, pw, next);
    else
      synthesis_level<1>(approx, tok, p.s_f[s], h2, w2, ph * pw, pw, next);
    approx = next;
    __syncthreads();
  }

  const int64_t H = p.height, W = p.width;
  const int64_t y0 = t.gy * (p.ph0 << L) + t.ty * Ht, x0 = t.gx * (p.pw0 << L) + t.tx * Wt;
  tok_t* img = static_cast<tok_t*>(p.image) + t.b * 3 * H * W + y0 * W + x0;
  if (p.vec_store)
    store_tile<V>(X, Ht, Wt, m, p.mix, img, W, H * W);
  else
    store_tile<1>(X, Ht, Wt, m, p.mix, img, W, H * W);
}

// ------------------------------------------------------------------------------ KV scatter

struct ScatterSide {
  const char* src;  // (B, H, n, D), element strides s[0..3]
  char* dst;        // (B_cache, H, N_max, D), element strides d[0..3]
  int64_t s[4], d[4];
};

// Copies every (b, h, t) row of D elements from src to dst row rows[b] at position lens[b] + t,
// `word` bytes per access (W words per element row). blockIdx.y picks k (0) or v (1).
template <typename word>
__global__ void __launch_bounds__(kThreads)
    kv_scatter_kernel(const ScatterSide k, const ScatterSide v, const int64_t* __restrict lens,
                      const int64_t* __restrict rows, int64_t heads, int64_t n, int64_t words, int64_t elem_size,
                      int64_t total) {
  const ScatterSide& side = blockIdx.y == 0 ? k : v;
  // With 16-byte words the rows are contiguous: stride 1 element; else one word is one element.
  const int64_t s3 = sizeof(word) == 16 ? 1 : side.s[3], d3 = sizeof(word) == 16 ? 1 : side.d[3];
  const int64_t step = sizeof(word) == 16 ? 16 / elem_size : 1;
  for (int64_t it = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; it < total; it += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = it % words, row = it / words;
    const int64_t t = row % n, h = (row / n) % heads, b = row / (n * heads);
    const int64_t from = b * side.s[0] + h * side.s[1] + t * side.s[2] + w * step * s3;
    const int64_t to = rows[b] * side.d[0] + h * side.d[1] + (lens[b] + t) * side.d[2] + w * step * d3;
    *reinterpret_cast<word*>(side.dst + to * elem_size) = *reinterpret_cast<const word*>(side.src + from * elem_size);
  }
}

// ------------------------------------------------------------------------------ host helpers

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Largest sub-tile (tile_h, tile_w) dividing (ph0, pw0) whose shared memory fits `limit` bytes,
// preferring full-width tiles, then cut into more rows until the grid fills the device.
struct TilePlan {
  int64_t tile_h, tile_w, smem;
};

TilePlan plan_tiles(const Geometry& g, int64_t acc_size, int64_t blocks_wanted, const char* op) {
  auto smem = [&](int64_t th, int64_t tw) { return 3 * (th << g.levels) * (tw << g.levels) * 5 / 4 * acc_size; };
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  for (const int64_t limit : {kDefaultSmem, static_cast<int64_t>(optin)}) {
    for (int64_t tw = g.pw0; tw >= 1; --tw) {
      if (g.pw0 % tw) continue;
      for (int64_t th = g.ph0; th >= 1; --th) {
        if (g.ph0 % th || smem(th, tw) > limit) continue;
        // Fits: cut into smaller row bands while the grid has too few blocks.
        const int64_t per_tile = g.batch * g.cells() * (g.pw0 / tw);
        for (int64_t smaller = th - 1; smaller >= 1 && per_tile * (g.ph0 / th) < blocks_wanted; --smaller)
          if (g.ph0 % smaller == 0) th = smaller;
        return {th, tw, smem(th, tw)};
      }
    }
  }
  TORCH_CHECK(false, op, ": a ", (1 << g.levels), "x", (1 << g.levels),
              " pixel tile needs more shared memory than the device offers (", optin,
              " bytes); use fewer levels or impl=\"triton\"/\"reference\"");
  return {};
}

int blocks_wanted() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return 4 * sms;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename in_t, typename out_t>
void launch_tokenize(TokenizeParams p, const Geometry& g, const TilePlan& tiles, cudaStream_t stream) {
  constexpr int64_t VI = vec16<in_t>, VO = vec16<out_t>;
  p.vec_load = p.s_w == 1 && (tiles.tile_w << g.levels) % VI == 0 && p.s_h % VI == 0 && p.s_c % VI == 0 &&
               p.s_b % VI == 0 && aligned16(p.images);
  p.vec_store = 0;
  for (int64_t s = 0; s <= g.levels; ++s) {
    const int64_t run = s == 0 ? tiles.tile_w : tiles.tile_w << (s - 1);
    if (g.patch_w(s) % VO == 0 && run % VO == 0 && aligned16(p.tokens[s])) p.vec_store |= 1u << s;
  }
  const int64_t blocks = g.batch * g.cells() * (g.ph0 / tiles.tile_h) * (g.pw0 / tiles.tile_w);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "wavelet_tokenize: too many tiles (", blocks, ") for one launch");
  auto kernel = tokenize_kernel<in_t, out_t>;
  allow_smem(kernel, tiles.smem);
  kernel<<<blocks, kThreads, tiles.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename tok_t>
void launch_detokenize(DetokenizeParams p, const Geometry& g, const TilePlan& tiles, cudaStream_t stream) {
  constexpr int64_t V = vec16<tok_t>;
  p.vec_load = 0;
  for (int64_t s = 0; s <= g.levels; ++s) {
    const int64_t run = s == 0 ? tiles.tile_w : tiles.tile_w << (s - 1);
    const bool ok = p.s_f[s] == 1 && p.s_g[s] % V == 0 && p.s_b[s] % V == 0 && g.patch_w(s) % V == 0 &&
                    run % V == 0 && aligned16(p.tokens[s]);
    if (ok) p.vec_load |= 1u << s;
  }
  p.vec_store = (tiles.tile_w << g.levels) % V == 0 && aligned16(p.image);
  const int64_t blocks = g.batch * g.cells() * (g.ph0 / tiles.tile_h) * (g.pw0 / tiles.tile_w);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "wavelet_detokenize: too many tiles (", blocks, ") for one launch");
  auto kernel = detokenize_kernel<tok_t>;
  allow_smem(kernel, tiles.smem);
  kernel<<<blocks, kThreads, tiles.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

ScatterSide scatter_side(const at::Tensor& src, const at::Tensor& dst) {
  ScatterSide side{static_cast<const char*>(src.const_data_ptr()), static_cast<char*>(dst.data_ptr()), {}, {}};
  for (int i = 0; i < 4; ++i) {
    side.s[i] = src.stride(i);
    side.d[i] = dst.stride(i);
  }
  return side;
}

// Whether 16-byte words can move whole contiguous rows of D elements on this side.
bool rows_vectorizable(const ScatterSide& side, int64_t D, int64_t es) {
  bool ok = side.s[3] == 1 && side.d[3] == 1 && (D * es) % 16 == 0 && aligned16(side.src) && aligned16(side.dst);
  for (int i = 0; i < 3; ++i) ok = ok && (side.s[i] * es) % 16 == 0 && (side.d[i] * es) % 16 == 0;
  return ok;
}

}  // namespace

std::vector<at::Tensor> wavelet_tokenize_cuda(const at::Tensor& images, const Geometry& g, bool ycbcr,
                                              at::ScalarType out_dtype) {
  TORCH_CHECK(g.levels + 1 <= kMaxStages, "wavelet_tokenize: the CUDA kernel supports at most ", kMaxStages - 1,
              " levels, got ", g.levels);
  const c10::cuda::CUDAGuard guard(images.device());
  const at::ScalarType in_type = images.scalar_type();
  // The kernel writes the input dtype or the compute dtype; any other out_dtype is a cast of the latter.
  const at::ScalarType acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType kernel_out = out_dtype == in_type ? in_type : acc_type;
  std::vector<at::Tensor> out;
  for (int64_t s = 0; s <= g.levels; ++s)
    out.push_back(at::empty({g.batch, g.cells(), g.dim(s)}, images.options().dtype(kernel_out)));
  if (g.batch > 0) {
    TokenizeParams p{};
    p.images = images.const_data_ptr();
    p.s_b = images.stride(0);
    p.s_c = images.stride(1);
    p.s_h = images.stride(2);
    p.s_w = images.stride(3);
    for (int64_t s = 0; s <= g.levels; ++s) p.tokens[s] = out[s].data_ptr();
    color_matrix(ycbcr, false, p.m);
    p.grid_h = g.grid_h;
    p.grid_w = g.grid_w;
    p.ph0 = g.ph0;
    p.pw0 = g.pw0;
    p.levels = static_cast<int>(g.levels);
    p.mix = ycbcr;
    const TilePlan tiles = plan_tiles(g, in_type == at::kDouble ? 8 : 4, blocks_wanted(), "wavelet_tokenize");
    p.tile_h = tiles.tile_h;
    p.tile_w = tiles.tile_w;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (in_type) {
      case at::kHalf:
        if (kernel_out == at::kHalf)
          launch_tokenize<c10::Half, c10::Half>(p, g, tiles, stream);
        else
          launch_tokenize<c10::Half, float>(p, g, tiles, stream);
        break;
      case at::kBFloat16:
        if (kernel_out == at::kBFloat16)
          launch_tokenize<c10::BFloat16, c10::BFloat16>(p, g, tiles, stream);
        else
          launch_tokenize<c10::BFloat16, float>(p, g, tiles, stream);
        break;
      case at::kFloat:
        launch_tokenize<float, float>(p, g, tiles, stream);
        break;
      default:
        launch_tokenize<double, double>(p, g, tiles, stream);
    }
  }
  if (kernel_out != out_dtype)
    for (auto& t : out) t = t.to(out_dtype);
  return out;
}

at::Tensor wavelet_detokenize_cuda(const std::vector<at::Tensor>& tokens, const Geometry& g, bool ycbcr) {
  TORCH_CHECK(g.levels + 1 <= kMaxStages, "wavelet_detokenize: the CUDA kernel supports at most ", kMaxStages - 1,
              " levels, got ", g.levels);
  const c10::cuda::CUDAGuard guard(tokens[0].device());
  at::Tensor image = at::empty({g.batch, 3, g.height, g.width}, tokens[0].options());
  if (g.batch == 0) return image;
  DetokenizeParams p{};
  for (int64_t s = 0; s <= g.levels; ++s) {
    p.tokens[s] = tokens[s].const_data_ptr();
    p.s_b[s] = tokens[s].stride(0);
    p.s_g[s] = tokens[s].stride(1);
    p.s_f[s] = tokens[s].stride(2);
  }
  p.image = image.data_ptr();
  p.height = g.height;
  p.width = g.width;
  color_matrix(ycbcr, true, p.m);
  p.grid_h = g.grid_h;
  p.grid_w = g.grid_w;
  p.ph0 = g.ph0;
  p.pw0 = g.pw0;
  p.levels = static_cast<int>(g.levels);
  p.mix = ycbcr;
  const at::ScalarType type = tokens[0].scalar_type();
  const TilePlan tiles = plan_tiles(g, type == at::kDouble ? 8 : 4, blocks_wanted(), "wavelet_detokenize");
  p.tile_h = tiles.tile_h;
  p.tile_w = tiles.tile_w;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (type) {
    case at::kHalf:
      launch_detokenize<c10::Half>(p, g, tiles, stream);
      break;
    case at::kBFloat16:
      launch_detokenize<c10::BFloat16>(p, g, tiles, stream);
      break;
    case at::kFloat:
      launch_detokenize<float>(p, g, tiles, stream);
      break;
    default:
      launch_detokenize<double>(p, g, tiles, stream);
  }
  return image;
}

void kv_scatter_cuda(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const AppendPlan& plan) {
  const int64_t B = k_new.size(0), heads = k_new.size(1), n = k_new.size(2), D = k_new.size(3);
  if (k_new.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(k_new.device());
  // lens then rows, (2, B) int64, uploaded on the current stream.
  at::Tensor host = at::empty({2, B}, k_new.options().device(at::kCPU).dtype(at::kLong));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    h[b] = plan.lens[b];
    h[B + b] = plan.rows[b];
  }
  const at::Tensor index = host.to(k_new.device());
  const int64_t* lens = index.const_data_ptr<int64_t>();
  const int64_t es = k_new.element_size();
  const ScatterSide k = scatter_side(k_new, k_cache), v = scatter_side(v_new, v_cache);
  const bool vec = rows_vectorizable(k, D, es) && rows_vectorizable(v, D, es);
  const int64_t words = vec ? D * es / 16 : D, total = B * heads * n * words;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535)), 2);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec)
    kv_scatter_kernel<uint4><<<grid, kThreads, 0, stream>>>(k, v, lens, lens + B, heads, n, words, es, total);
  else if (es == 2)
    kv_scatter_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(k, v, lens, lens + B, heads, n, words, es, total);
  else if (es == 4)
    kv_scatter_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(k, v, lens, lens + B, heads, n, words, es, total);
  else
    kv_scatter_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(k, v, lens, lens + B, heads, n, words, es, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace waveclip
