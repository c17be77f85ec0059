// CPU kernels (OpenMP): the fused wavelet tokenizer, its inverse, and the KV-cache append scatter.
//
// Tokenizer: one pass over the image. The unit of work is one (image, grid row): its ch image rows
// are read once, row by row, and colour-mixed into a thread-local scratch; then each grid cell of
// the row, whose Haar pyramid is self-contained, runs all L levels in cache and writes every
// stage's token for the cell once. A cell's token of stage s is one contiguous run of 9*Ph*Pw
// features laid out (channel, band, py, px), exactly the layout a level produces, so it is copied
// out as one run (non-temporal stores when the dtype is the compute dtype). The arithmetic of every
// element is fixed by its cell alone: results do not depend on the number of threads. The inverse
// mirrors it.
#include "waveclip.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <omp.h>
#ifdef __SSE2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

namespace waveclip {
namespace {

// Compute type: float64 stays float64, every other float type is computed in float32.
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One channel-mixed row: out_c[j] = sum_k m[c][k] * in_k[j] for the three input rows of one pixel
// row (strided by `stride` elements; UNIT means stride 1, so the compiler sees a unit-stride loop).
template <bool UNIT, typename in_t, typename acc_t>
inline void color_row(const in_t* __restrict r, const in_t* __restrict g, const in_t* __restrict b, int64_t stride,
                      int64_t n, const acc_t (&m)[3][3], bool mix, acc_t* __restrict o0, acc_t* __restrict o1,
                      acc_t* __restrict o2) {
  if (mix) {
    const acc_t m00 = m[0][0], m01 = m[0][1], m02 = m[0][2], m10 = m[1][0], m11 = m[1][1], m12 = m[1][2];
    const acc_t m20 = m[2][0], m21 = m[2][1], m22 = m[2][2];
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = UNIT ? j : j * stride;
      const acc_t x0 = static_cast<acc_t>(r[at]), x1 = static_cast<acc_t>(g[at]), x2 = static_cast<acc_t>(b[at]);
      o0[j] = (m00 * x0 + m01 * x1) + m02 * x2;
      o1[j] = (m10 * x0 + m11 * x1) + m12 * x2;
      o2[j] = (m20 * x0 + m21 * x1) + m22 * x2;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = UNIT ? j : j * stride;
      o0[j] = static_cast<acc_t>(r[at]);
      o1[j] = static_cast<acc_t>(g[at]);
      o2[j] = static_cast<acc_t>(b[at]);
    }
  }
}

// One analysis level on a tile: src (3, h, w) with row stride `stride` (channel planes h*stride
// apart) -> approximation A (3, h/2, w/2) and the detail bands (3 channels x [H, V, D], h/2, w/2).
// Same operation order as the reference, so bit-identical to it.
template <typename acc_t>
void haar_level(const acc_t* __restrict src, int64_t h, int64_t w, int64_t stride, acc_t* __restrict approx,
                acc_t* __restrict bands) {
  const int64_t h2 = h / 2, w2 = w / 2, n2 = h2 * w2;
  const acc_t half = acc_t(0.5);
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t i = 0; i < h2; ++i) {
      const acc_t* r0 = src + (c * h + 2 * i) * stride;
      const acc_t* r1 = r0 + stride;
      acc_t* a = approx + c * n2 + i * w2;
      acc_t* hb = bands + 3 * c * n2 + i * w2;
      acc_t* vb = hb + n2;
      acc_t* db = vb + n2;
      for (int64_t j = 0; j < w2; ++j) {
        const acc_t p = r0[2 * j], q = r0[2 * j + 1], r = r1[2 * j], s = r1[2 * j + 1];
        const acc_t sum = p + q, dif = p - q;
        a[j] = ((sum + r) + s) * half;
        hb[j] = ((sum - r) - s) * half;
        vb[j] = ((dif + r) - s) * half;
        db[j] = ((dif - r) + s) * half;
      }
    }
  }
}

// One synthesis level, the exact inverse of haar_level: A (3, h2, w2) and bands -> dst (3, 2*h2, 2*w2)
// with row stride `stride` (channel planes 2*h2*stride apart).
template <typename acc_t>
void haar_synth(const acc_t* __restrict approx, const acc_t* __restrict bands, int64_t h2, int64_t w2, int64_t stride,
                acc_t* __restrict dst) {
  const int64_t n2 = h2 * w2;
  const acc_t half = acc_t(0.5);
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t i = 0; i < h2; ++i) {
      const acc_t* a = approx + c * n2 + i * w2;
      const acc_t* hb = bands + 3 * c * n2 + i * w2;
      const acc_t* vb = hb + n2;
      const acc_t* db = vb + n2;
      acc_t* o0 = dst + (c * 2 * h2 + 2 * i) * stride;
      acc_t* o1 = o0 + stride;
      for (int64_t j = 0; j < w2; ++j) {
        const acc_t sum = a[j] + hb[j], dif = a[j] - hb[j];
        o0[2 * j] = ((sum + vb[j]) + db[j]) * half;
        o0[2 * j + 1] = ((sum - vb[j]) - db[j]) * half;
        o1[2 * j] = ((dif + vb[j]) - db[j]) * half;
        o1[2 * j + 1] = ((dif - vb[j]) + db[j]) * half;
      }
    }
  }
}

// dst[j] = out_t(src[j]) for a contiguous run (rounding as torch's .to()).
template <typename acc_t, typename out_t>
void convert_run(const acc_t* __restrict src, void* dst, int64_t n) {
  out_t* __restrict o = static_cast<out_t*>(dst);
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<out_t>(src[j]);
}

// Same-dtype runs bypass the cache with non-temporal stores when the destination is 16-byte aligned:
// tokens are written once and not read back, so no destination line has to be read first.
template <>
void convert_run<float, float>(const float* __restrict src, void* dst, int64_t n) {
  float* o = static_cast<float*>(dst);
  int64_t j = 0;
#ifdef __SSE2__
  if (reinterpret_cast<uintptr_t>(o) % 16 == 0)
    for (; j + 4 <= n; j += 4) _mm_stream_ps(o + j, _mm_loadu_ps(src + j));
#endif
  for (; j < n; ++j) o[j] = src[j];
}

template <>
void convert_run<double, double>(const double* __restrict src, void* dst, int64_t n) {
  double* o = static_cast<double*>(dst);
  int64_t j = 0;
#ifdef __SSE2__
  if (reinterpret_cast<uintptr_t>(o) % 16 == 0)
    for (; j + 2 <= n; j += 2) _mm_stream_pd(o + j, _mm_loadu_pd(src + j));
#endif
  for (; j < n; ++j) o[j] = src[j];
}

// Makes this thread's non-temporal stores visible before the op returns.
inline void store_fence() {
#ifdef __SSE2__
  _mm_sfence();
#endif
}

template <typename acc_t>
using ConvertFn = void (*)(const acc_t*, void*, int64_t);

template <typename acc_t>
ConvertFn<acc_t> converter(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return convert_run<acc_t, c10::Half>;
    case at::kBFloat16:
      return convert_run<acc_t, c10::BFloat16>;
    case at::kFloat:
      return convert_run<acc_t, float>;
    default:
      return convert_run<acc_t, double>;
  }
}

// dst[j] = acc_t(src[j * stride]) (tokens may be strided).
template <typename in_t, typename acc_t>
void load_run(const in_t* __restrict src, int64_t stride, int64_t n, acc_t* __restrict dst) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j * stride]);
  }
}

// Per-thread scratch is allocated uninitialized (std::make_unique_for_overwrite): every kernel writes each
// scratch element before it reads it, so zeroing it would be one more pass per call.

// Runs body(work_item, thread_id) for work items [0, n) on at::get_num_threads() OpenMP threads,
// statically partitioned. Bodies never throw.
template <typename F>
void parallel_items(int64_t n, int nthreads, const F& body) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 1 && nthreads > 1)
  for (int64_t item = 0; item < n; ++item) body(item, omp_get_thread_num());
}

template <typename in_t>
void tokenize_typed(const at::Tensor& images, const Geometry& g, bool ycbcr, std::vector<at::Tensor>& out) {
  using acc_t = acc_of<in_t>;
  const int64_t L = g.levels, ch = g.cell_h(), cw = g.cell_w(), W = g.width, G = g.cells();
  const int64_t sB = images.stride(0), sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
  const in_t* x = images.const_data_ptr<in_t>();  // (B, 3, H, W), strides (sB, sC, sH, sW)

  double md[3][3];
  color_matrix(ycbcr, false, md);
  acc_t m[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = static_cast<acc_t>(md[i][k]);

  const ConvertFn<acc_t> store = converter<acc_t>(out[0].scalar_type());
  const int64_t out_size = out[0].element_size();
  std::vector<char*> dst(L + 1);  // stage s: (B, G, dim_s) contiguous
  std::vector<int64_t> row_bytes(L + 1);
  for (int64_t s = 0; s <= L; ++s) {
    dst[s] = static_cast<char*>(out[s].data_ptr());
    row_bytes[s] = g.dim(s) * out_size;
  }

  // Per-thread scratch: one grid row of the colour-mixed image (3, ch, W), read row by row, two
  // ping-pong approximations of one cell (3, ch/2, cw/2) each and one stage's bands (9, ch/2, cw/2).
  const int64_t band = 3 * ch * W, quarter = 3 * (ch / 2) * (cw / 2), per_thread = band + 5 * quarter;
  const int nthreads = at::get_num_threads();
  const auto scratch = std::make_unique_for_overwrite<acc_t[]>(per_thread * nthreads);

  parallel_items(g.batch * g.grid_h, nthreads, [&](int64_t item, int thread) {
    const int64_t b = item / g.grid_h, gy = item % g.grid_h;
    acc_t* rows = scratch.get() + thread * per_thread;  // (3, ch, W)
    acc_t* ping[2] = {rows + band, rows + band + quarter};
    acc_t* bands = rows + band + 2 * quarter;  // (9, ch/2, cw/2)
    for (int64_t y = 0; y < ch; ++y) {
      const in_t* r = x + b * sB + (gy * ch + y) * sH;
      acc_t* o = rows + y * W;
      if (sW == 1)
        color_row<true>(r, r + sC, r + 2 * sC, 1, W, m, ycbcr, o, o + ch * W, o + 2 * ch * W);
      else
        color_row<false>(r, r + sC, r + 2 * sC, sW, W, m, ycbcr, o, o + ch * W, o + 2 * ch * W);
    }
    for (int64_t gx = 0; gx < g.grid_w; ++gx) {
      const int64_t cell = b * G + gy * g.grid_w + gx;
      // Level lv's bands are stage L-lv+1's token of this cell; its A feeds level lv+1.
      const acc_t* src = rows + gx * cw;
      int64_t h = ch, w = cw, stride = W;
      for (int64_t lv = 1; lv <= L; ++lv) {
        const int64_t s = L - lv + 1;
        char* token = dst[s] + cell * row_bytes[s];
        acc_t* approx = ping[(lv - 1) % 2];
        haar_level(src, h, w, stride, approx, bands);
        store(bands, token, 9 * (h / 2) * (w / 2));
        src = approx;
        h /= 2;
        w /= 2;
        stride = w;
      }
      if (L > 0) {
        store(src, dst[0] + cell * row_bytes[0], g.dim(0));
      } else {  // levels=0: the stage-0 token is the colour-mixed cell itself, one run per (channel, row)
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t y = 0; y < ch; ++y)
            store(src + (c * ch + y) * W, dst[0] + cell * row_bytes[0] + (c * ch + y) * cw * out_size, cw);
      }
    }
    store_fence();
  });
}

template <typename tok_t>
void detokenize_typed(const std::vector<at::Tensor>& tokens, const Geometry& g, bool ycbcr, at::Tensor& image) {
  using acc_t = acc_of<tok_t>;
  const int64_t L = g.levels, ch = g.cell_h(), cw = g.cell_w(), H = g.height, W = g.width;

  double md[3][3];
  color_matrix(ycbcr, true, md);
  acc_t m[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = static_cast<acc_t>(md[i][k]);

  std::vector<const tok_t*> src(L + 1);  // stage s: (B, G, dim_s), strides (sb[s], sg[s], sf[s])
  std::vector<int64_t> sb(L + 1), sg(L + 1), sf(L + 1);
  for (int64_t s = 0; s <= L; ++s) {
    src[s] = tokens[s].const_data_ptr<tok_t>();
    sb[s] = tokens[s].stride(0);
    sg[s] = tokens[s].stride(1);
    sf[s] = tokens[s].stride(2);
  }
  tok_t* out = image.data_ptr<tok_t>();  // (B, 3, H, W) contiguous

  // Per-thread scratch: one grid row of the rebuilt image (3, ch, W), two ping-pong approximations
  // of one cell (3, ch/2, cw/2) each, and one stage's bands (9, ch/2, cw/2).
  const int64_t band = 3 * ch * W, quarter = 3 * (ch / 2) * (cw / 2), per_thread = band + 5 * quarter;
  const int nthreads = at::get_num_threads();
  const auto scratch = std::make_unique_for_overwrite<acc_t[]>(per_thread * nthreads);

  parallel_items(g.batch * g.grid_h, nthreads, [&](int64_t item, int thread) {
    const int64_t b = item / g.grid_h, gy = item % g.grid_h;
    acc_t* rows = scratch.get() + thread * per_thread;  // (3, ch, W)
    acc_t* ping[2] = {rows + band, rows + band + quarter};
    acc_t* bands = rows + band + 2 * quarter;  // (9, ch/2, cw/2)
    for (int64_t gx = 0; gx < g.grid_w; ++gx) {
      const int64_t cell = gy * g.grid_w + gx;
      const tok_t* token0 = src[0] + b * sb[0] + cell * sg[0];
      if (L == 0) {  // levels=0: the stage-0 token is the cell itself, one run per (channel, row)
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t y = 0; y < ch; ++y) load_run(token0 + (c * ch + y) * cw * sf[0], sf[0], cw, rows + (c * ch + y) * W + gx * cw);
        continue;
      }
      acc_t* approx = ping[L % 2];
      load_run(token0, sf[0], g.dim(0), approx);
      int64_t h2 = g.ph0, w2 = g.pw0;
      // Level lv rebuilds the level lv-1 approximation; level 1 writes the cell into the row buffer.
      for (int64_t lv = L; lv >= 1; --lv) {
        const int64_t s = L - lv + 1;
        load_run(src[s] + b * sb[s] + cell * sg[s], sf[s], g.dim(s), bands);
        acc_t* next = lv == 1 ? rows + gx * cw : ping[(lv - 1) % 2];
        haar_synth(approx, bands, h2, w2, lv == 1 ? W : 2 * w2, next);
        approx = next;
        h2 *= 2;
        w2 *= 2;
      }
    }
    const int64_t plane = ch * W;
    for (int64_t y = 0; y < ch; ++y) {
      const acc_t* __restrict c0 = rows + y * W;
      const acc_t* __restrict c1 = c0 + plane;
      const acc_t* __restrict c2 = c1 + plane;
      tok_t* __restrict o0 = out + b * 3 * H * W + (gy * ch + y) * W;
      tok_t* __restrict o1 = o0 + H * W;
      tok_t* __restrict o2 = o1 + H * W;
      if (ycbcr) {
        const acc_t m00 = m[0][0], m01 = m[0][1], m02 = m[0][2], m10 = m[1][0], m11 = m[1][1], m12 = m[1][2];
        const acc_t m20 = m[2][0], m21 = m[2][1], m22 = m[2][2];
        for (int64_t j = 0; j < W; ++j) {
          o0[j] = static_cast<tok_t>((m00 * c0[j] + m01 * c1[j]) + m02 * c2[j]);
          o1[j] = static_cast<tok_t>((m10 * c0[j] + m11 * c1[j]) + m12 * c2[j]);
          o2[j] = static_cast<tok_t>((m20 * c0[j] + m21 * c1[j]) + m22 * c2[j]);
        }
      } else {
        for (int64_t j = 0; j < W; ++j) {
          o0[j] = static_cast<tok_t>(c0[j]);
          o1[j] = static_cast<tok_t>(c1[j]);
          o2[j] = static_cast<tok_t>(c2[j]);
        }
      }
    }
  });
}

// Copies one (b, h, t) row of D elements of `word` bytes each between strided tensors.
template <typename word>
inline void copy_strided(const char* src, int64_t s_stride, char* dst, int64_t d_stride, int64_t n) {
  const word* s = reinterpret_cast<const word*>(src);
  word* d = reinterpret_cast<word*>(dst);
  for (int64_t j = 0; j < n; ++j) d[j * d_stride] = s[j * s_stride];
}

// One side (keys or values) of the append: copies row (b, h, t) of src (B, H, n, D) to position
// lens[b] + t of cache row rows[b].
struct ScatterSide {
  const char* s;  // (B, H, n, D), strides s0..s3 (elements)
  char* d;        // (B_cache, H, N_max, D), strides d0..d3 (elements)
  int64_t s0, s1, s2, s3, d0, d1, d2, d3;

  ScatterSide(const at::Tensor& src, const at::Tensor& dst)
      : s(static_cast<const char*>(src.const_data_ptr())), d(static_cast<char*>(dst.data_ptr())),
        s0(src.stride(0)), s1(src.stride(1)), s2(src.stride(2)), s3(src.stride(3)), d0(dst.stride(0)),
        d1(dst.stride(1)), d2(dst.stride(2)), d3(dst.stride(3)) {}

  // Whether the n rows of one (b, h) are one contiguous run on both sides.
  bool runs(int64_t D) const { return s3 == 1 && d3 == 1 && s2 == D && d2 == D; }

  void copy_run(int64_t b, int64_t h, int64_t n, int64_t D, int64_t es, const AppendPlan& plan) const {
    std::memcpy(d + (plan.rows[b] * d0 + h * d1 + plan.lens[b] * d2) * es, s + (b * s0 + h * s1) * es, n * D * es);
  }

  void copy_row(int64_t b, int64_t h, int64_t t, int64_t D, int64_t es, const AppendPlan& plan) const {
    const char* from = s + (b * s0 + h * s1 + t * s2) * es;
    char* to = d + (plan.rows[b] * d0 + h * d1 + (plan.lens[b] + t) * d2) * es;
    if (s3 == 1 && d3 == 1) {
      std::memcpy(to, from, D * es);
    } else if (es == 2) {
      copy_strided<uint16_t>(from, s3, to, d3, D);
    } else if (es == 4) {
      copy_strided<uint32_t>(from, s3, to, d3, D);
    } else {
      copy_strided<uint64_t>(from, s3, to, d3, D);
    }
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
// The float32 tokenizer with AVX-512, picked at run time on CPUs that have it. The unit of work is the
// same (image, grid row) strip, taken one cell at a time: level 1 reads the cell's image rows (prefetched
// twelve row pairs ahead, into the next cell and the next strip) and colour-mixes them in registers (no
// scratch pass), storing the bands straight into the cell's token and the approximation into a one-cell
// scratch; then the cell's later levels run on its own planes in cache, every output vector 16
// consecutive features of one token plane. Every token store is one whole, aligned 64-byte line, so on
// outputs larger than a core's L2 the stores are non-temporal (STREAM): the lines go to memory without
// being read first, and the kernel moves the bytes of a copy. Without the colour matrix ("rgb") every
// result is bit-identical to the generic path's; with it, the FMAs may round the float32 sums
// differently.
#define WAVECLIP_HAS_AVX512_TOKENIZER 1
#define WAVECLIP_AVX512 __attribute__((target("avx512f")))

// The Haar butterfly of haar_level on 16 outputs: p, q the even and odd pixels of the top rows, r, s
// those of the bottom rows, all already multiplied by 1/2: A, H, V, D without haar_level's final
// multiplications. Scaling by a power of two is exact (in the normal range), so the results are the
// same; NEXT multiplies A by 1/2 once more, the scaling of the next level's inputs.
struct Quad {
  __m512 a, h, v, d;
};
template <bool NEXT>
WAVECLIP_AVX512 inline Quad butterfly(__m512 p, __m512 q, __m512 r, __m512 s) {
  const __m512 sum = _mm512_add_ps(p, q), dif = _mm512_sub_ps(p, q);
  const __m512 a = _mm512_add_ps(_mm512_add_ps(sum, r), s);
  return {NEXT ? _mm512_mul_ps(a, _mm512_set1_ps(0.5f)) : a, _mm512_sub_ps(_mm512_sub_ps(sum, r), s),
          _mm512_sub_ps(_mm512_add_ps(dif, r), s), _mm512_add_ps(_mm512_sub_ps(dif, r), s)};
}

// Even and odd elements of the 32 floats a:b.
WAVECLIP_AVX512 inline __m512 evens(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
}
WAVECLIP_AVX512 inline __m512 odds(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
}

// One vector store; STREAM: non-temporal, to a 64-byte aligned address.
template <bool STREAM>
WAVECLIP_AVX512 inline void store_vector(float* at, __m512 v) {
  if constexpr (STREAM)
    _mm512_stream_ps(at, v);
  else
    _mm512_storeu_ps(at, v);
}

// Stores the four outputs of one butterfly: H, V, D into three consecutive band planes from `band`
// (`plane` floats apart), A at `approx`. A is streamed too when it is a token (STREAM_A).
template <bool STREAM, bool STREAM_A>
WAVECLIP_AVX512 inline void store_quad(const Quad& o, float* band, int64_t plane, float* approx) {
  store_vector<STREAM_A>(approx, o.a);
  store_vector<STREAM>(band, o.h);
  store_vector<STREAM>(band + plane, o.v);
  store_vector<STREAM>(band + 2 * plane, o.d);
}

// How far ahead level 1 prefetches its image rows, in row pairs of the strip's (cell, row pair) order:
// on into the next cells and past the strip's end into the next strip (a prefetch never faults,
// whatever the address). With 16-wide patches 12 to 24 measured about the same, 8 or fewer slower.
constexpr int64_t kPrefetchRowPairs = 12;

// Level 1 of cell gx of a strip, fused with the colour transform (MIX: m is the matrix pre-multiplied by
// 1/2; without it the pixels are multiplied by 1/2 alone): image rows [0, 2 * h2) of the strip at x
// (unit-stride rows, channel planes sC apart, rows sH apart, `cells` cells of 2 * pw pixels), columns
// [2 * pw * gx, 2 * pw * (gx + 1)) -> the cell's bands (3 channels x [H, V, D], h2, pw) at `bands` and
// its approximation (3, h2, pw) at `approx`, times 1/2 unless LAST. Needs pw % 16 == 0.
template <bool MIX, bool LAST, bool STREAM>
WAVECLIP_AVX512 void level1_cell(const float* x, int64_t sC, int64_t sH, int64_t h2, int64_t pw, int64_t gx,
                                 int64_t cells, const float (&m)[3][3], float* bands, float* approx) {
  const int64_t plane = h2 * pw;
  const __m512 half = _mm512_set1_ps(0.5f);
  __m512 mv[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) mv[i][k] = _mm512_set1_ps(m[i][k]);
  // The row pair kPrefetchRowPairs on: row pair `ahead_row` of cell `ahead_cell`, `ahead_strip` strips on.
  // Its address is formed as an integer: it may lie past the end of the images.
  const int64_t ahead = gx * h2 + kPrefetchRowPairs;
  int64_t ahead_strip = ahead / (h2 * cells), ahead_cell = ahead / h2 % cells, ahead_row = ahead % h2;
  const auto prefetch = [x](int64_t at) {
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x) + at * sizeof(float)), _MM_HINT_T0);
  };
  for (int64_t py = 0; py < h2; ++py) {
    const float* top = x + 2 * py * sH;
    const float* bottom = top + sH;
    const int64_t next_row = 2 * (ahead_strip * h2 + ahead_row) * sH;
    float* band = bands + py * pw;
    float* low = approx + py * pw;
    for (int64_t px = 0; px < pw; px += 16) {
      const int64_t col = 2 * (gx * pw + px), next = next_row + 2 * (ahead_cell * pw + px);
      __m512 t[2][3][2];  // (image row, channel, first/second 16 pixels)
      for (int c = 0; c < 3; ++c)
        for (int k = 0; k < 2; ++k) {
          t[0][c][k] = _mm512_loadu_ps(top + c * sC + col + 16 * k);
          t[1][c][k] = _mm512_loadu_ps(bottom + c * sC + col + 16 * k);
          prefetch(next + c * sC + 16 * k);
          prefetch(next + sH + c * sC + 16 * k);
        }
      for (int r = 0; r < 2; ++r)
        for (int k = 0; k < 2; ++k) {
          const __m512 x0 = t[r][0][k], x1 = t[r][1][k], x2 = t[r][2][k];
          for (int c = 0; c < 3; ++c)
            t[r][c][k] = MIX ? _mm512_fmadd_ps(mv[c][2], x2, _mm512_fmadd_ps(mv[c][1], x1, _mm512_mul_ps(mv[c][0], x0)))
                             : _mm512_mul_ps(t[r][c][k], half);
        }
      for (int c = 0; c < 3; ++c) {
        const Quad o = butterfly<!LAST>(evens(t[0][c][0], t[0][c][1]), odds(t[0][c][0], t[0][c][1]),
                                         evens(t[1][c][0], t[1][c][1]), odds(t[1][c][0], t[1][c][1]));
        store_quad<STREAM, STREAM && LAST>(o, band + 3 * c * plane + px, plane, low + c * plane + px);
      }
    }
    if (++ahead_row == h2) {
      ahead_row = 0;
      if (++ahead_cell == cells) {
        ahead_cell = 0;
        ++ahead_strip;
      }
    }
  }
}

// Whether cell_level can run on (ph, pw) output planes: whole vectors of 16 consecutive outputs, each
// either part of one row (pw a multiple of 16) or 16 / pw whole rows (pw 1, 2, 4 or 8).
bool cell_level_fits(int64_t ph, int64_t pw) {
  return pw % 16 == 0 || (pw <= 8 && 16 % pw == 0 && ph % (16 / pw) == 0);
}

// For outputs of pw <= 8 columns: lanes[0, 16) are the lanes of the 32 floats a:b (16 / pw input rows
// of 2 * pw) that hold its even rows, in order, and lanes[16, 32) those of its odd rows (unused for pw
// a multiple of 16, the default).
struct RowLanes {
  int32_t lanes[32];
  explicit RowLanes(int64_t pw = 16) {
    const int64_t w = 2 * std::min<int64_t>(pw, 8);
    for (int64_t odd = 0; odd < 2; ++odd)
      for (int64_t t = 0; t < 16; ++t) lanes[16 * odd + t] = static_cast<int32_t>((2 * (t / w) + odd) * w + t % w);
  }
};

// One later level of one cell: src (3, 2 * ph, 2 * pw) contiguous, already times 1/2 -> the bands
// (3 channels x [H, V, D], ph, pw) at `bands` and the approximation (3, ph, pw) at `approx`, times 1/2
// unless LAST. Output vector o holds features [16 o, 16 o + 16) of a plane: with pw % 16 == 0 a part of
// row 16 o / pw, whose inputs are two rows of 32; with pw <= 8 rows 16 o / pw .., whose inputs are the
// 64 floats from 4 o, split into even and odd rows first (`rows`). The bands are tokens (streamed when
// STREAM), the approximation a token only when LAST.
template <bool LAST, bool STREAM>
WAVECLIP_AVX512 void cell_level(const float* src, int64_t ph, int64_t pw, const RowLanes& rows, float* bands,
                                float* approx) {
  const int64_t plane = ph * pw;
  const __m512i even = _mm512_loadu_si512(rows.lanes), odd = _mm512_loadu_si512(rows.lanes + 16);
  for (int64_t c = 0; c < 3; ++c) {
    const float* in = src + 4 * c * plane;
    float* band = bands + 3 * c * plane;
    float* low = approx + c * plane;
    for (int64_t o = 0; o < plane; o += 16) {
      __m512 top[2], bottom[2];
      if (pw % 16 == 0) {
        const float* row = in + 4 * (o / pw) * pw + 2 * (o % pw);
        for (int k = 0; k < 2; ++k) {
          top[k] = _mm512_loadu_ps(row + 16 * k);
          bottom[k] = _mm512_loadu_ps(row + 2 * pw + 16 * k);
        }
      } else {
        for (int k = 0; k < 2; ++k) {
          const __m512 a = _mm512_loadu_ps(in + 4 * o + 32 * k), b = _mm512_loadu_ps(in + 4 * o + 32 * k + 16);
          top[k] = _mm512_permutex2var_ps(a, even, b);
          bottom[k] = _mm512_permutex2var_ps(a, odd, b);
        }
      }
      const Quad q = butterfly<!LAST>(evens(top[0], top[1]), odds(top[0], top[1]), evens(bottom[0], bottom[1]),
                                      odds(bottom[0], bottom[1]));
      store_quad<STREAM, STREAM && LAST>(q, band + o, plane, low + o);
    }
  }
}

// Whether the AVX-512 path takes these images: float32 in and out, unit-stride rows, at least one
// level, level-1 patches a multiple of 16 wide, every later patch fit for cell_level, and a CPU with
// AVX-512F.
bool avx512_tokenizer_applies(const at::Tensor& images, const Geometry& g, at::ScalarType out) {
  static const bool cpu_has = __builtin_cpu_supports("avx512f");
  if (!cpu_has || images.scalar_type() != at::kFloat || out != at::kFloat || images.stride(3) != 1 || g.levels < 1 ||
      g.patch_w(g.levels) % 16 != 0)
    return false;
  for (int64_t s = 0; s < g.levels; ++s)
    if (!cell_level_fits(g.patch_h(s), g.patch_w(s))) return false;
  return true;
}

// Outputs above this size (one core's L2) take non-temporal stores. Measured on a 2-core AMD EPYC (48 KiB
// L1d, 1 MiB L2): on one 224 px image (0.6 MB of tokens) regular stores were as fast or up to 8% faster;
// streaming was about 7% faster on 2 and 4 images and nearly twice as fast on 8.
constexpr int64_t kStreamBytes = int64_t(1) << 20;

// Whether the AVX-512 kernel streams these tokens: their float32 bytes over kStreamBytes.
bool avx512_tokenizer_streams(const Geometry& g) {
  int64_t bytes = 0;
  for (int64_t s = 0; s <= g.levels; ++s) bytes += g.batch * g.cells() * g.dim(s) * int64_t(sizeof(float));
  return bytes > kStreamBytes;
}

template <bool MIX, bool STREAM>
void tokenize_avx512_typed(const float* x, int64_t sB, int64_t sC, int64_t sH, const Geometry& g,
                           const float (&m)[3][3], const std::vector<float*>& dst) {
  const int64_t L = g.levels, ch = g.cell_h(), h1 = ch / 2, pw1 = g.patch_w(L), gw = g.grid_w;
  std::vector<RowLanes> rows(L + 1);  // level lv's, for its outputs of patch_w(L - lv + 1) columns
  for (int64_t lv = 2; lv <= L; ++lv) rows[lv] = RowLanes(g.patch_w(L - lv + 1));
  // Per-thread scratch: one cell's level-1 approximation (3, h1, pw1) and two ping-pong approximations
  // after it.
  const int64_t cell_a1 = g.dim(L) / 3, pong = cell_a1 / 4, per_thread = cell_a1 + 2 * pong;
  const int nthreads = at::get_num_threads();
  const auto scratch = std::make_unique_for_overwrite<float[]>(per_thread * nthreads);
  parallel_items(g.batch * g.grid_h, nthreads, [&](int64_t item, int thread) {
    const int64_t b = item / g.grid_h, gy = item % g.grid_h, first_cell = b * g.cells() + gy * gw;
    float* level1 = scratch.get() + thread * per_thread;
    float* pongs = level1 + cell_a1;
    auto token = [&](int64_t s, int64_t gx) { return dst[s] + (first_cell + gx) * g.dim(s); };
    const float* strip = x + b * sB + gy * ch * sH;
    for (int64_t gx = 0; gx < gw; ++gx) {
      if (L == 1) {  // A1 is the stage-0 token
        level1_cell<MIX, true, STREAM>(strip, sC, sH, h1, pw1, gx, gw, m, token(1, gx), token(0, gx));
        continue;
      }
      level1_cell<MIX, false, STREAM>(strip, sC, sH, h1, pw1, gx, gw, m, token(L, gx), level1);
      const float* src = level1;
      for (int64_t lv = 2; lv < L; ++lv) {
        float* approx = pongs + (lv % 2) * pong;
        cell_level<false, STREAM>(src, g.patch_h(L - lv + 1), g.patch_w(L - lv + 1), rows[lv], token(L - lv + 1, gx),
                                  approx);
        src = approx;
      }
      cell_level<true, STREAM>(src, g.patch_h(1), g.patch_w(1), rows[L], token(1, gx), token(0, gx));
    }
    if constexpr (STREAM) _mm_sfence();  // this thread's streamed lines are visible before the op returns
  });
}

void tokenize_avx512(const at::Tensor& images, const Geometry& g, bool ycbcr, std::vector<at::Tensor>& out) {
  const float* x = images.const_data_ptr<float>();  // (B, 3, H, W), strides (sB, sC, sH, 1)
  double md[3][3];
  color_matrix(ycbcr, false, md);
  float m[3][3];  // the colour matrix times 1/2 (the level-1 Haar scaling, exact)
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = 0.5f * static_cast<float>(md[i][k]);
  const bool stream = avx512_tokenizer_streams(g);
  std::vector<float*> dst(g.levels + 1);  // stage s: (B, G, dim_s) contiguous
  for (int64_t s = 0; s <= g.levels; ++s) {
    dst[s] = out[s].data_ptr<float>();
    // Token dims and plane offsets are multiples of 16 floats: every store is aligned if the tensor is.
    TORCH_CHECK(!stream || reinterpret_cast<uintptr_t>(dst[s]) % 64 == 0, "wavelet_tokenize: stage ", s,
                " tokens are not 64-byte aligned for streaming stores");
  }
  const int64_t sB = images.stride(0), sC = images.stride(1), sH = images.stride(2);
  if (ycbcr && stream)
    tokenize_avx512_typed<true, true>(x, sB, sC, sH, g, m, dst);
  else if (ycbcr)
    tokenize_avx512_typed<true, false>(x, sB, sC, sH, g, m, dst);
  else if (stream)
    tokenize_avx512_typed<false, true>(x, sB, sC, sH, g, m, dst);
  else
    tokenize_avx512_typed<false, false>(x, sB, sC, sH, g, m, dst);
}
#endif

}  // namespace

std::string cpu_tokenizer_kernel(const at::Tensor& images, const Geometry& g, at::ScalarType out_dtype) {
#ifdef WAVECLIP_HAS_AVX512_TOKENIZER
  if (avx512_tokenizer_applies(images, g, out_dtype)) return avx512_tokenizer_streams(g) ? "avx512-stream" : "avx512";
#endif
  return "generic";
}

std::vector<at::Tensor> wavelet_tokenize_cpu(const at::Tensor& images, const Geometry& g, bool ycbcr,
                                             at::ScalarType out_dtype) {
  std::vector<at::Tensor> out;
  for (int64_t s = 0; s <= g.levels; ++s)
    out.push_back(at::empty({g.batch, g.cells(), g.dim(s)}, images.options().dtype(out_dtype)));
  if (g.batch == 0) return out;
  switch (images.scalar_type()) {
    case at::kHalf:
      tokenize_typed<c10::Half>(images, g, ycbcr, out);
      break;
    case at::kBFloat16:
      tokenize_typed<c10::BFloat16>(images, g, ycbcr, out);
      break;
    case at::kFloat:
#ifdef WAVECLIP_HAS_AVX512_TOKENIZER
      if (avx512_tokenizer_applies(images, g, out_dtype)) {
        tokenize_avx512(images, g, ycbcr, out);
        break;
      }
#endif
      tokenize_typed<float>(images, g, ycbcr, out);
      break;
    default:
      tokenize_typed<double>(images, g, ycbcr, out);
  }
  return out;
}

at::Tensor wavelet_detokenize_cpu(const std::vector<at::Tensor>& tokens, const Geometry& g, bool ycbcr) {
  at::Tensor image = at::empty({g.batch, 3, g.height, g.width}, tokens[0].options());
  if (g.batch == 0) return image;
  switch (tokens[0].scalar_type()) {
    case at::kHalf:
      detokenize_typed<c10::Half>(tokens, g, ycbcr, image);
      break;
    case at::kBFloat16:
      detokenize_typed<c10::BFloat16>(tokens, g, ycbcr, image);
      break;
    case at::kFloat:
      detokenize_typed<float>(tokens, g, ycbcr, image);
      break;
    default:
      detokenize_typed<double>(tokens, g, ycbcr, image);
  }
  return image;
}

void kv_scatter_cpu(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const AppendPlan& plan) {
  if (k_new.numel() == 0) return;
  const int64_t H = k_new.size(1), n = k_new.size(2), D = k_new.size(3), es = k_new.element_size();
  const int64_t rows = k_new.size(0) * H * n;
  const ScatterSide sides[2] = {ScatterSide(k_new, k_cache), ScatterSide(v_new, v_cache)};
  if (sides[0].runs(D) && sides[1].runs(D)) {  // one memcpy per (side, b, h)
    const int64_t heads = k_new.size(0) * H;
    parallel_items(2 * heads, at::get_num_threads(), [&](int64_t item, int) {
      const int64_t i = item % heads;
      sides[item / heads].copy_run(i / H, i % H, n, D, es, plan);
    });
    return;
  }
  // Keys and values in one parallel region: item i < rows copies a key row, the others value rows.
  parallel_items(2 * rows, at::get_num_threads(), [&](int64_t item, int) {
    const int64_t i = item % rows, t = i % n, h = (i / n) % H, b = i / (n * H);
    sides[item / rows].copy_row(b, h, t, D, es, plan);
  });
}

}  // namespace waveclip
