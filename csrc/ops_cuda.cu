// CUDA kernels: the fused wavelet tokenizer, its inverse, and the KV-cache append scatter.
//
// Tokenizer: one thread block per sub-tile of a grid cell, a (tile_h << L) x (tile_w << L) pixel
// rectangle whose Haar pyramid is self-contained. The block reads its pixels once (16-byte loads
// where the strides allow), applies the colour transform on the way into shared memory, runs all L
// levels there and writes every stage's tokens once (16-byte stores where the token layout allows).
// The inverse mirrors it. The KV scatter copies k_new/v_new rows into the caches, 16 bytes at a time
// when rows are contiguous and aligned, element by element otherwise.
#include "cuda_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

namespace waveclip::cuda {
namespace {

constexpr int kThreads = 256;
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

// Block -> (batch b, cell, sub-tile row ty, sub-tile column tx): int64, once per block.
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

// n / d and n % d for 0 <= n < 2**31 by one multiply-high (Granlund-Montgomery), so that the
// per-element index split inside a tile costs no integer division. Built once per loop per block.
struct FastDivmod {
  uint32_t d, m, shift;
  __device__ explicit FastDivmod(uint32_t divisor) : d(divisor), shift(0) {
    while ((1u << shift) < d) ++shift;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> shift; }
  __device__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * d;
  }
};

// Shared-memory runs of N consecutive acc_t values, moved 16 bytes per access where N allows (8 where
// it does not): a thread's run is one wide access instead of N scalar ones, so the threads of a warp,
// whose runs are adjacent, hit distinct banks (at most 2-way for runs of 32 bytes, 4-way for 64).
// Callers keep runs aligned: their offsets are multiples of N.
template <typename T, int N>
__device__ inline void smem_load(const T* __restrict src, T (&v)[N]) {
  constexpr int C = (N * sizeof(T)) % 16 == 0 ? 16 / sizeof(T) : ((N * sizeof(T)) % 8 == 0 ? 8 / sizeof(T) : 1);
#pragma unroll
  for (int k = 0; k < N; k += C) {
    const Pack<T, C> pk = *reinterpret_cast<const Pack<T, C>*>(src + k);
#pragma unroll
    for (int e = 0; e < C; ++e) v[k + e] = pk.v[e];
  }
}

template <typename T, int N>
__device__ inline void smem_store(T* __restrict dst, const T (&v)[N]) {
  constexpr int C = (N * sizeof(T)) % 16 == 0 ? 16 / sizeof(T) : ((N * sizeof(T)) % 8 == 0 ? 8 / sizeof(T) : 1);
#pragma unroll
  for (int k = 0; k < N; k += C) {
    Pack<T, C> pk;
#pragma unroll
    for (int e = 0; e < C; ++e) pk.v[e] = v[k + e];
    *reinterpret_cast<Pack<T, C>*>(dst + k) = pk;
  }
}

// ------------------------------------------------------------------------------ tokenizer
// In-tile indices are int32 (a tile fits in shared memory, far below 2**31 elements); only the
// block's global base offsets are int64.

// Reads the sub-tile's pixels (V per access) and writes the colour-mixed tile X (3, Ht, Wt).
template <int V, typename in_t, typename acc_t>
__device__ void load_tile(const in_t* __restrict img, const TokenizeParams& p, int Ht, int Wt,
                          const acc_t (&m)[3][3], acc_t* __restrict X) {
  const FastDivmod groups(Wt / V);
  for (int it = threadIdx.x; it < Ht * int(groups.d); it += blockDim.x) {
    uint32_t y, g;
    groups.divmod(it, y, g);
    const int j0 = int(g) * V;
    const in_t* px = img + int64_t(y) * p.s_h + int64_t(j0) * p.s_w;
    Pack<in_t, V> ch[3];
    for (int c = 0; c < 3; ++c) {
      if constexpr (V > 1) {
        ch[c] = *reinterpret_cast<const Pack<in_t, V>*>(px + c * p.s_c);
      } else {
        ch[c].v[0] = px[c * p.s_c];
      }
    }
    acc_t o0[V], o1[V], o2[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t x0 = static_cast<acc_t>(ch[0].v[k]), x1 = static_cast<acc_t>(ch[1].v[k]);
      const acc_t x2 = static_cast<acc_t>(ch[2].v[k]);
      if (p.mix) {
        o0[k] = (m[0][0] * x0 + m[0][1] * x1) + m[0][2] * x2;
        o1[k] = (m[1][0] * x0 + m[1][1] * x1) + m[1][2] * x2;
        o2[k] = (m[2][0] * x0 + m[2][1] * x1) + m[2][2] * x2;
      } else {
        o0[k] = x0;
        o1[k] = x1;
        o2[k] = x2;
      }
    }
    acc_t* o = X + y * Wt + j0;
    smem_store(o, o0);
    smem_store(o + Ht * Wt, o1);
    smem_store(o + 2 * Ht * Wt, o2);
  }
}

// One analysis level: src (3, 2*h2, 2*w2) -> dst A (3, h2, w2) in shared memory, detail bands
// straight to the stage's token: band (c, k) at tok + (3c+k)*band_n + i*pw + j, V columns per item.
template <int V, typename acc_t, typename out_t>
__device__ void analysis_level(const acc_t* __restrict src, acc_t* __restrict dst, int h2, int w2,
                               out_t* __restrict tok, int band_n, int pw) {
  const FastDivmod groups(w2 / V), rows(h2);
  const acc_t half = acc_t(0.5);
  for (int it = threadIdx.x; it < 3 * h2 * int(groups.d); it += blockDim.x) {
    uint32_t row, g, c, i;
    groups.divmod(it, row, g);
    rows.divmod(row, c, i);
    const int j0 = int(g) * V;
    acc_t top[2 * V], bottom[2 * V], approx[V];
    smem_load(src + (c * 2 * h2 + 2 * i) * (2 * w2) + 2 * j0, top);
    smem_load(src + (c * 2 * h2 + 2 * i + 1) * (2 * w2) + 2 * j0, bottom);
    Pack<out_t, V> hb, vb, db;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t a = top[2 * k], b = top[2 * k + 1], cc = bottom[2 * k], d = bottom[2 * k + 1];
      const acc_t sum = a + b, dif = a - b;
      approx[k] = ((sum + cc) + d) * half;
      hb.v[k] = static_cast<out_t>(((sum - cc) - d) * half);
      vb.v[k] = static_cast<out_t>(((dif + cc) - d) * half);
      db.v[k] = static_cast<out_t>(((dif - cc) + d) * half);
    }
    smem_store(dst + (c * h2 + i) * w2 + j0, approx);
    out_t* o = tok + 3 * int(c) * band_n + int(i) * pw + j0;
    *reinterpret_cast<Pack<out_t, V>*>(o) = hb;
    *reinterpret_cast<Pack<out_t, V>*>(o + band_n) = vb;
    *reinterpret_cast<Pack<out_t, V>*>(o + 2 * band_n) = db;
  }
}

// Stage 0: A_L (3, th, tw) in shared memory -> token rows at tok + c*band_n + i*pw + j.
template <int V, typename acc_t, typename out_t>
__device__ void store_approx(const acc_t* __restrict src, int th, int tw, out_t* __restrict tok, int band_n, int pw) {
  const FastDivmod groups(tw / V), rows(th);
  for (int it = threadIdx.x; it < 3 * th * int(groups.d); it += blockDim.x) {
    uint32_t row, g, c, i;
    groups.divmod(it, row, g);
    rows.divmod(row, c, i);
    const int j0 = int(g) * V;
    acc_t v[V];
    smem_load(src + (c * th + i) * tw + j0, v);
    Pack<out_t, V> a;
#pragma unroll
    for (int k = 0; k < V; ++k) a.v[k] = static_cast<out_t>(v[k]);
    *reinterpret_cast<Pack<out_t, V>*>(tok + int(c) * band_n + int(i) * pw + j0) = a;
  }
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) tokenize_kernel(const TokenizeParams p) {
  using acc_t = acc_of<in_t>;
  constexpr int VI = vec16<in_t>, VO = vec16<out_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int L = p.levels;
  const TileIndex t(blockIdx.x, p.grid_h, p.grid_w, p.ph0 / p.tile_h, p.pw0 / p.tile_w);
  const int Ht = int(p.tile_h) << L, Wt = int(p.tile_w) << L;
  const int64_t G = p.grid_h * p.grid_w;
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
    const int h2 = int(p.tile_h) << (L - lv), w2 = int(p.tile_w) << (L - lv);
    const int ph = int(p.ph0) << (L - lv), pw = int(p.pw0) << (L - lv);
    out_t* tok = static_cast<out_t*>(p.tokens[s]) + (t.b * G + t.cell) * (9 * int64_t(ph) * pw) +
                 t.ty * h2 * pw + t.tx * w2;
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
    store_approx<VO>(approx, int(p.tile_h), int(p.tile_w), tok0, int(p.ph0 * p.pw0), int(p.pw0));
  else
    store_approx<1>(approx, int(p.tile_h), int(p.tile_w), tok0, int(p.ph0 * p.pw0), int(p.pw0));
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
__device__ void load_approx(const tok_t* __restrict tok, int64_t sf, int th, int tw, int band_n, int pw,
                            acc_t* __restrict dst) {
  const FastDivmod groups(tw / V), rows(th);
  for (int it = threadIdx.x; it < 3 * th * int(groups.d); it += blockDim.x) {
    uint32_t row, g, c, i;
    groups.divmod(it, row, g);
    rows.divmod(row, c, i);
    const int j0 = int(g) * V;
    acc_t a[V];
    load_features<V>(tok + int64_t(int(c) * band_n + int(i) * pw + j0) * sf, a);
    smem_store(dst + (c * th + i) * tw + j0, a);
  }
}

// One synthesis level: A (3, h2, w2) in shared memory and the stage's bands from the token
// -> dst (3, 2*h2, 2*w2) in shared memory.
template <int V, typename tok_t, typename acc_t>
__device__ void synthesis_level(const acc_t* __restrict src, const tok_t* __restrict tok, int64_t sf, int h2, int w2,
                                int band_n, int pw, acc_t* __restrict dst) {
  const FastDivmod groups(w2 / V), rows(h2);
  const acc_t half = acc_t(0.5);
  for (int it = threadIdx.x; it < 3 * h2 * int(groups.d); it += blockDim.x) {
    uint32_t row, g, c, i;
    groups.divmod(it, row, g);
    rows.divmod(row, c, i);
    const int j0 = int(g) * V;
    const tok_t* f = tok + int64_t(3 * int(c) * band_n + int(i) * pw + j0) * sf;
    acc_t hb[V], vb[V], db[V], a[V], top[2 * V], bottom[2 * V];
    load_features<V>(f, hb);
    load_features<V>(f + band_n * sf, vb);
    load_features<V>(f + 2 * band_n * sf, db);
    smem_load(src + (c * h2 + i) * w2 + j0, a);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t sum = a[k] + hb[k], dif = a[k] - hb[k];
      top[2 * k] = ((sum + vb[k]) + db[k]) * half;
      top[2 * k + 1] = ((sum - vb[k]) - db[k]) * half;
      bottom[2 * k] = ((dif + vb[k]) - db[k]) * half;
      bottom[2 * k + 1] = ((dif - vb[k]) + db[k]) * half;
    }
    acc_t* o0 = dst + (c * 2 * h2 + 2 * i) * (2 * w2) + 2 * j0;
    smem_store(o0, top);
    smem_store(o0 + 2 * w2, bottom);
  }
}

// X (3, Ht, Wt) in shared memory -> inverse colour -> image rows (V pixels per store).
template <int V, typename tok_t, typename acc_t>
__device__ void store_tile(const acc_t* __restrict X, int Ht, int Wt, const acc_t (&m)[3][3], bool mix,
                           tok_t* __restrict img, int64_t W, int64_t plane) {
  const FastDivmod groups(Wt / V);
  for (int it = threadIdx.x; it < Ht * int(groups.d); it += blockDim.x) {
    uint32_t y, g;
    groups.divmod(it, y, g);
    const int j0 = int(g) * V;
    acc_t x0[V], x1[V], x2[V];
    smem_load(X + y * Wt + j0, x0);
    smem_load(X + Ht * Wt + y * Wt + j0, x1);
    smem_load(X + 2 * Ht * Wt + y * Wt + j0, x2);
    Pack<tok_t, V> out[3];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (mix) {
        for (int c = 0; c < 3; ++c)
          out[c].v[k] = static_cast<tok_t>((m[c][0] * x0[k] + m[c][1] * x1[k]) + m[c][2] * x2[k]);
      } else {
        out[0].v[k] = static_cast<tok_t>(x0[k]);
        out[1].v[k] = static_cast<tok_t>(x1[k]);
        out[2].v[k] = static_cast<tok_t>(x2[k]);
      }
    }
    for (int c = 0; c < 3; ++c) *reinterpret_cast<Pack<tok_t, V>*>(img + c * plane + int64_t(y) * W + j0) = out[c];
  }
}

template <typename tok_t>
__global__ void __launch_bounds__(kThreads) detokenize_kernel(const DetokenizeParams p) {
  using acc_t = acc_of<tok_t>;
  constexpr int V = vec16<tok_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int L = p.levels;
  const TileIndex t(blockIdx.x, p.grid_h, p.grid_w, p.ph0 / p.tile_h, p.pw0 / p.tile_w);
  const int Ht = int(p.tile_h) << L, Wt = int(p.tile_w) << L;
  acc_t* X = reinterpret_cast<acc_t*>(smem);  // (3, Ht, Wt): levels with lv-1 even write here
  acc_t* P = X + 3 * Ht * Wt;                   // (3, Ht/2, Wt/2): the others
  acc_t m[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = static_cast<acc_t>(p.m[i][k]);

  acc_t* approx = (L & 1) ? P : X;
  {
    const tok_t* tok = static_cast<const tok_t*>(p.tokens[0]) + t.b * p.s_b[0] + t.cell * p.s_g[0] +
                       (t.ty * p.tile_h * p.pw0 + t.tx * p.tile_w) * p.s_f[0];
    const int th = int(p.tile_h), tw = int(p.tile_w), band_n = int(p.ph0 * p.pw0), pw = int(p.pw0);
    if (p.vec_load & 1u)
      load_approx<V>(tok, p.s_f[0], th, tw, band_n, pw, approx);
    else
      load_approx<1>(tok, p.s_f[0], th, tw, band_n, pw, approx);
  }
  __syncthreads();
  for (int lv = L; lv >= 1; --lv) {
    const int s = L - lv + 1;
    const int h2 = int(p.tile_h) << (L - lv), w2 = int(p.tile_w) << (L - lv);
    const int ph = int(p.ph0) << (L - lv), pw = int(p.pw0) << (L - lv);
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

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Sub-tile (tile_h, tile_w) in stage-0 pixels, dividing (ph0, pw0): the largest whose shared memory
// fits 48 KB (else the device's opt-in limit), preferring full cell width, then cut into more row
// bands while the grid has fewer than 4 blocks per multiprocessor.
struct TilePlan {
  int64_t tile_h, tile_w, smem;
};

TilePlan plan_tiles(int64_t batch, int64_t cells, int64_t ph0, int64_t pw0, int levels, int64_t acc_size,
                    const char* op) {
  auto smem = [&](int64_t th, int64_t tw) { return 3 * (th << levels) * (tw << levels) * 5 / 4 * acc_size; };
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int64_t wanted = 4 * int64_t(device_attribute(cudaDevAttrMultiProcessorCount));
  for (const int64_t limit : {kDefaultSmem, optin}) {
    for (int64_t tw = pw0; tw >= 1; --tw) {
      if (pw0 % tw) continue;
      for (int64_t th = ph0; th >= 1; --th) {
        if (ph0 % th || smem(th, tw) > limit) continue;
        const int64_t per_band = batch * cells * (pw0 / tw);
        for (int64_t smaller = th - 1; smaller >= 1 && per_band * (ph0 / th) < wanted; --smaller)
          if (ph0 % smaller == 0) th = smaller;
        const int64_t blocks = per_band * (ph0 / th);
        TORCH_CHECK(blocks < (int64_t(1) << 31), op, ": too many tiles (", blocks, ") for one launch");
        return {th, tw, smem(th, tw)};
      }
    }
  }
  TORCH_CHECK(false, op, ": one ", (int64_t(1) << levels), "x", (int64_t(1) << levels),
              " pixel tile needs more shared memory than the device offers (", optin,
              " bytes); use fewer levels or impl=\"triton\"/\"reference\"");
  return {};
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, int64_t blocks, int64_t smem, cudaStream_t stream, const Params& params) {
  if (smem > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t, typename out_t>
void tokenize_typed(TokenizeParams p, int64_t batch, cudaStream_t stream) {
  constexpr int64_t VI = vec16<in_t>, VO = vec16<out_t>;
  const int64_t cells = p.grid_h * p.grid_w;
  const TilePlan t = plan_tiles(batch, cells, p.ph0, p.pw0, p.levels, sizeof(acc_of<in_t>), "wavelet_tokenize");
  p.tile_h = t.tile_h;
  p.tile_w = t.tile_w;
  p.vec_load = p.s_w == 1 && (t.tile_w << p.levels) % VI == 0 && p.s_h % VI == 0 && p.s_c % VI == 0 &&
               p.s_b % VI == 0 && aligned16(p.images);
  p.vec_store = 0;
  for (int s = 0; s <= p.levels; ++s) {
    const int64_t run = s == 0 ? t.tile_w : t.tile_w << (s - 1), pw = s == 0 ? p.pw0 : p.pw0 << (s - 1);
    if (pw % VO == 0 && run % VO == 0 && aligned16(p.tokens[s])) p.vec_store |= 1u << s;
  }
  const int64_t blocks = batch * cells * (p.ph0 / t.tile_h) * (p.pw0 / t.tile_w);
  launch(tokenize_kernel<in_t, out_t>, blocks, t.smem, stream, p);
}

template <typename tok_t>
void detokenize_typed(DetokenizeParams p, int64_t batch, cudaStream_t stream) {
  constexpr int64_t V = vec16<tok_t>;
  const int64_t cells = p.grid_h * p.grid_w;
  const TilePlan t = plan_tiles(batch, cells, p.ph0, p.pw0, p.levels, sizeof(acc_of<tok_t>), "wavelet_detokenize");
  p.tile_h = t.tile_h;
  p.tile_w = t.tile_w;
  p.vec_load = 0;
  for (int s = 0; s <= p.levels; ++s) {
    const int64_t run = s == 0 ? t.tile_w : t.tile_w << (s - 1), pw = s == 0 ? p.pw0 : p.pw0 << (s - 1);
    const bool ok = p.s_f[s] == 1 && p.s_g[s] % V == 0 && p.s_b[s] % V == 0 && pw % V == 0 && run % V == 0 &&
                    aligned16(p.tokens[s]);
    if (ok) p.vec_load |= 1u << s;
  }
  p.vec_store = (t.tile_w << p.levels) % V == 0 && aligned16(p.image);
  const int64_t blocks = batch * cells * (p.ph0 / t.tile_h) * (p.pw0 / t.tile_w);
  launch(detokenize_kernel<tok_t>, blocks, t.smem, stream, p);
}

// Whether 16-byte words can move whole contiguous rows of D elements on this side.
bool rows_vectorizable(const ScatterSide& side, int64_t D, int64_t es) {
  bool ok = side.s[3] == 1 && side.d[3] == 1 && (D * es) % 16 == 0 && aligned16(side.src) && aligned16(side.dst);
  for (int i = 0; i < 3; ++i) ok = ok && (side.s[i] * es) % 16 == 0 && (side.d[i] * es) % 16 == 0;
  return ok;
}

}  // namespace

void tokenize(const TokenizeParams& p, Dtype in, Dtype out, int64_t batch, cudaStream_t stream) {
  if (in == Dtype::kHalf && out == Dtype::kHalf)
    tokenize_typed<c10::Half, c10::Half>(p, batch, stream);
  else if (in == Dtype::kHalf && out == Dtype::kFloat)
    tokenize_typed<c10::Half, float>(p, batch, stream);
  else if (in == Dtype::kBFloat16 && out == Dtype::kBFloat16)
    tokenize_typed<c10::BFloat16, c10::BFloat16>(p, batch, stream);
  else if (in == Dtype::kBFloat16 && out == Dtype::kFloat)
    tokenize_typed<c10::BFloat16, float>(p, batch, stream);
  else if (in == Dtype::kFloat && out == Dtype::kFloat)
    tokenize_typed<float, float>(p, batch, stream);
  else if (in == Dtype::kDouble && out == Dtype::kDouble)
    tokenize_typed<double, double>(p, batch, stream);
  else
    TORCH_CHECK(false, "wavelet_tokenize: the CUDA kernel writes the input or the compute dtype only");
}

void detokenize(const DetokenizeParams& p, Dtype dtype, int64_t batch, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kHalf:
      return detokenize_typed<c10::Half>(p, batch, stream);
    case Dtype::kBFloat16:
      return detokenize_typed<c10::BFloat16>(p, batch, stream);
    case Dtype::kFloat:
      return detokenize_typed<float>(p, batch, stream);
    case Dtype::kDouble:
      return detokenize_typed<double>(p, batch, stream);
  }
}

void kv_scatter(const ScatterSide& k, const ScatterSide& v, const int64_t* lens, const int64_t* rows, int64_t batch,
                int64_t heads, int64_t n, int64_t D, int64_t elem_size, cudaStream_t stream) {
  const bool vec = rows_vectorizable(k, D, elem_size) && rows_vectorizable(v, D, elem_size);
  const int64_t words = vec ? D * elem_size / 16 : D, total = batch * heads * n * words;
  if (total == 0) return;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535)), 2);
  if (vec)
    kv_scatter_kernel<uint4><<<grid, kThreads, 0, stream>>>(k, v, lens, rows, heads, n, words, elem_size, total);
  else if (elem_size == 2)
    kv_scatter_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(k, v, lens, rows, heads, n, words, elem_size, total);
  else if (elem_size == 4)
    kv_scatter_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(k, v, lens, rows, heads, n, words, elem_size, total);
  else
    kv_scatter_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(k, v, lens, rows, heads, n, words, elem_size, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace waveclip::cuda
