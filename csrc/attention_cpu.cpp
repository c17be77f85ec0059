// CPU attention (OpenMP + BLAS): block-causal attention and attention of new queries to cache prefixes.
//
// Both ops reduce to one unit of work, a job: `rows` query rows of one (batch, head) attend the keys and
// values [0, len) of one (batch or cache row, head). One thread computes a job whole: S = Q K^T by
// one sgemm into a thread-local (rows, len) buffer, the softmax numerator of each row (max, exp, sum) in
// place, O = P V by a second sgemm straight into the output rows, then each row is divided by its sum.
// When asked (for the backward), the job also writes each row's log-sum-exp, max + log(sum), of the
// scaled scores: the convention of PyTorch's CPU flash attention, whose backward reads it.
// A block-causal query block only reads its own prefix: masked (query, key) pairs are never computed, and
// nothing (not even a NaN) flows from a later block into an earlier one.
//
// Jobs are fixed by the shapes alone (equal query tiles sized to the prefix, the last one shorter), each runs on
// one thread, and BLAS runs sequentially inside the always-active parallel region, so the arithmetic of
// every output element, and hence the result, does not depend on the number of threads.
#include "waveclip.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <omp.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// Fortran BLAS of the BLAS library torch links (MKL on x86). Weak: an extension loaded into a torch
// without them still loads; `cpu_attention_available` then says no and the ops refuse.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One copy of the function per instruction set, picked at load time for the CPU it runs on.
#define WAVECLIP_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WAVECLIP_SIMD_CLONES
#endif

namespace waveclip {
namespace {

constexpr int64_t kMaxTileRows = 256;          // most query rows per job
constexpr int64_t kScoreBytes = 640 * 1024;     // a job's (rows, len) score buffer stays in L2 (1 MiB+)

// Column-major BLAS: C (m x n) = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp(x) for x <= 0 in float32 (Cephes' polynomial, about 1 ulp), written so that the loop around it
// vectorizes: 2**n is built from the bits of the rounding constant. x below -87 gives exp(-87) (under
// 2e-38 of the row maximum's weight 1); NaN stays NaN.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.0f;  // 1.5 * 2**23
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  x = x < -87.0f ? -87.0f : x;
  const float t = x * kLog2e + kRound;  // round(x * log2(e)) in the low mantissa bits
  const float n = t - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t scale = (std::bit_cast<uint32_t>(t) - std::bit_cast<uint32_t>(kRound) + 127u) << 23;
  return p * std::bit_cast<float>(scale);
}

// p[0, len) <- exp(scale * p - m) with m = max(scale * p): the softmax numerator of the scaled row
// (the scale is applied here, not by the sgemm, which would take one more pass over the scores).
// Returns the sum of the new values, and m in *max.
WAVECLIP_SIMD_CLONES float softmax_numerator(float* __restrict p, int64_t len, float scale, float* max) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < len; ++j) {
    const float x = p[j] * scale;
    m = x > m ? x : m;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const float y = exp_nonpositive(p[j] * scale - m);
    p[j] = y;
    sum += y;
  }
  *max = m;
  return sum;
}

double softmax_numerator(double* __restrict p, int64_t len, double scale, double* max) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < len; ++j) m = p[j] * scale > m ? p[j] * scale : m;
  double sum = 0.0;
  for (int64_t j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] * scale - m);
    sum += p[j];
  }
  *max = m;
  return sum;
}

// One job: `rows` queries attend keys/values [0, len).
template <typename T>
struct Job {
  const T* q;  // (rows, D), row stride Layout::q
  const T* k;  // (len, D), row stride Layout::k
  const T* v;  // (len, D), row stride Layout::v
  T* out;      // (rows, D), row stride Layout::out
  T* lse;      // (rows,) unit-stride, or nullptr when not asked for
  int64_t rows, len;
};

// Row strides (elements) shared by every job of one call; the head dim is unit-stride.
struct Layout {
  int64_t q, k, v, out, head_dim;
};

template <typename T>
void run_job(const Job<T>& job, const Layout& l, T scale, T* scores) {
  const int rows = static_cast<int>(job.rows), len = static_cast<int>(job.len), D = static_cast<int>(l.head_dim);
  // scores (rows, len) row-major = (K Q^T) column-major, unscaled.
  gemm('T', 'N', len, rows, D, T(1), job.k, static_cast<int>(l.k), job.q, static_cast<int>(l.q), T(0), scores, len);
  T inv[kMaxTileRows];
  for (int i = 0; i < rows; ++i) {
    T max;
    const T sum = softmax_numerator(scores + static_cast<int64_t>(i) * len, len, scale, &max);
    inv[i] = T(1) / sum;
    if (job.lse != nullptr) job.lse[i] = max + std::log(sum);
  }
  // out (rows, D) row-major = (V^T P^T) column-major.
  gemm('N', 'N', D, rows, len, T(1), job.v, static_cast<int>(l.v), scores, len, T(0), job.out, static_cast<int>(l.out));
  for (int i = 0; i < rows; ++i) {
    T* o = job.out + i * l.out;
    for (int d = 0; d < D; ++d) o[d] *= inv[i];
  }
}

template <typename T>
void run_jobs(const std::vector<Job<T>>& jobs, const Layout& l, double scale) {
  int64_t max_scores = 0;
  for (const auto& job : jobs) max_scores = std::max(max_scores, job.rows * job.len);
  const int nthreads = at::get_num_threads();
  const auto count = static_cast<int64_t>(jobs.size());
  // Always an active parallel region (even for one job), so BLAS inside never spawns threads of its own.
#pragma omp parallel num_threads(nthreads)
  {
    // Each thread's score buffer lives on between calls (no allocation, no page faults per call).
    thread_local std::vector<T> scores;
    if (scores.size() < static_cast<size_t>(max_scores)) scores.resize(max_scores);
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < count; ++j) run_job(jobs[j], l, static_cast<T>(scale), scores.data());
  }
}

// Query tiles of a block of n rows attending `len` keys: as few tiles as keep each job's score buffer
// within kScoreBytes (and at most kMaxTileRows rows), of equal size but the last, which may be shorter.
template <typename T, typename F>
void for_each_tile(int64_t n, int64_t len, const F& body) {
  const int64_t fit = kScoreBytes / (static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(len, 1));
  const int64_t most = std::clamp<int64_t>(fit, 16, kMaxTileRows);
  const int64_t tiles = (n + most - 1) / most, rows = tiles > 0 ? (n + tiles - 1) / tiles : 0;
  for (int64_t begin = 0; begin < n; begin += rows) body(begin, std::min(rows, n - begin));
}

// A tensor whose last dim is unit-stride and whose rows (dim 2) BLAS can step through, in the compute dtype.
at::Tensor as_rows(const at::Tensor& t, at::ScalarType compute) {
  at::Tensor out = t.scalar_type() == compute ? t : t.to(compute);
  const bool ok = out.stride(3) == 1 && (out.size(2) <= 1 || out.stride(2) >= out.size(3)) &&
                  out.stride(2) < INT_MAX;
  return ok ? out : out.contiguous();
}

int64_t row_stride(const at::Tensor& t) { return t.size(2) <= 1 ? t.size(3) : t.stride(2); }

at::ScalarType compute_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
void block_causal_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::vector<int64_t>& block_sizes, double scale, at::Tensor& out, at::Tensor* lse) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const Layout l{row_stride(q), row_stride(k), row_stride(v), out.stride(2), q.size(3)};
  const T* qp = q.const_data_ptr<T>();  // (B, H, N, D), strides q.stride()
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();                               // (B, H, N, D) contiguous
  T* lp = lse != nullptr ? lse->data_ptr<T>() : nullptr;  // (B, H, N) contiguous
  std::vector<Job<T>> jobs;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      T* lb = lp != nullptr ? lp + (b * H + h) * N : nullptr;
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      int64_t start = 0;
      for (const int64_t size : block_sizes) {
        const int64_t end = start + size;
        for_each_tile<T>(size, end, [&](int64_t t0, int64_t rows) {
          const int64_t row = start + t0;
          jobs.push_back({qp + b * q.stride(0) + h * q.stride(1) + row * l.q, kb, vb,
                          op + b * out.stride(0) + h * out.stride(1) + row * l.out,
                          lb != nullptr ? lb + row : nullptr, rows, end});
        });
        start = end;
      }
    }
  }
  run_jobs(jobs, l, scale);
}

template <typename T>
void prefixes_typed(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const AppendPlan& plan, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2);
  const Layout l{row_stride(q), row_stride(k_cache), row_stride(v_cache), out.stride(2), q.size(3)};
  const T* qp = q.const_data_ptr<T>();        // (B, H, n, D)
  const T* kp = k_cache.const_data_ptr<T>();  // (B_cache, H, >= max len, D)
  const T* vp = v_cache.const_data_ptr<T>();
  T* op = out.data_ptr<T>();  // (B, H, n, D) contiguous
  std::vector<Job<T>> jobs;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = plan.rows[b], len = plan.lens[b] + n;
    for (int64_t h = 0; h < H; ++h) {
      for_each_tile<T>(n, len, [&](int64_t t0, int64_t rows) {
        jobs.push_back({qp + b * q.stride(0) + h * q.stride(1) + t0 * l.q,
                        kp + r * k_cache.stride(0) + h * k_cache.stride(1),
                        vp + r * v_cache.stride(0) + h * v_cache.stride(1),
                        op + b * out.stride(0) + h * out.stride(1) + t0 * l.out, nullptr, rows, len});
      });
    }
  }
  run_jobs(jobs, l, scale);
}

}  // namespace

bool cpu_attention_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

std::tuple<at::Tensor, at::Tensor> block_causal_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::vector<int64_t>& block_sizes, double scale,
                                                              bool with_lse) {
  TORCH_CHECK(cpu_attention_available(), "block_causal_attention: this torch exports no BLAS sgemm_/dgemm_");
  const at::ScalarType ct = compute_type(q);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor lse = at::empty(with_lse ? q.sizes().slice(0, 3) : at::IntArrayRef{0}, q.options().dtype(ct));
  if (q.numel() == 0) return {out.to(q.scalar_type()), lse};
  const at::Tensor qc = as_rows(q, ct), kc = as_rows(k, ct), vc = as_rows(v, ct);
  at::Tensor* lse_out = with_lse ? &lse : nullptr;
  if (ct == at::kDouble)
    block_causal_typed<double>(qc, kc, vc, block_sizes, scale, out, lse_out);
  else
    block_causal_typed<float>(qc, kc, vc, block_sizes, scale, out, lse_out);
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

at::Tensor attend_prefixes_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const AppendPlan& plan, double scale) {
  TORCH_CHECK(cpu_attention_available(), "attention_with_kv_append: this torch exports no BLAS sgemm_/dgemm_");
  const at::ScalarType ct = compute_type(q);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(ct));
  if (q.numel() == 0) return out.to(q.scalar_type());
  int64_t max_len = 0;
  for (size_t b = 0; b < plan.lens.size(); ++b) max_len = std::max(max_len, plan.lens[b] + q.size(2));
  // Only the prefixes are read (and converted, for float16/bfloat16 caches).
  const at::Tensor kc = as_rows(k_cache.narrow(2, 0, max_len), ct), vc = as_rows(v_cache.narrow(2, 0, max_len), ct);
  const at::Tensor qc = as_rows(q, ct);
  if (ct == at::kDouble)
    prefixes_typed<double>(qc, kc, vc, plan, scale, out);
  else
    prefixes_typed<float>(qc, kc, vc, plan, scale, out);
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

}  // namespace waveclip
