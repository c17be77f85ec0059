// Host side of the extension: argument validation, routing to the CPU or CUDA kernels, attention
// over the cache prefixes (attention_cpu.cpp on the CPU, ATen's SDPA on CUDA), and the Python module.
//
// Every check runs before anything is allocated or written, so bad input from Python is a Python
// exception (ValueError / TypeError / RuntimeError), never a crash.
#include "waveclip.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/_scaled_dot_product_attention_math.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/csrc/utils/pybind.h>

#include <pybind11/stl.h>

#include <algorithm>
#include <set>

#ifdef WAVECLIP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_kernels.h"
#endif

namespace waveclip {

void color_matrix(bool ycbcr, bool inverse, double m[3][3]) {
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) m[i][k] = ycbcr ? kYCbCrFromRGB[i][k] : double(i == k);
  if (!ycbcr || !inverse) return;
  // Inverse by the adjugate, in float64.
  const double(&a)[3][3] = kYCbCrFromRGB;
  const double det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) -
                     a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0]) +
                     a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
  for (int i = 0; i < 3; ++i) {
    for (int k = 0; k < 3; ++k) {
      // Cofactor of a[k][i] (transposed) over the determinant.
      const int r0 = (k + 1) % 3, r1 = (k + 2) % 3, c0 = (i + 1) % 3, c1 = (i + 2) % 3;
      m[i][k] = (a[r0][c0] * a[r1][c1] - a[r0][c1] * a[r1][c0]) / det;
    }
  }
}

bool is_float_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

namespace {

bool check_common(const char* op, int64_t levels, int64_t grid_h, int64_t grid_w, const std::string& color,
                  int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(levels >= 0 && levels <= 30, op, ": levels must be in [0, 30], got ", levels);
  TORCH_CHECK_VALUE(grid_h >= 1 && grid_w >= 1, op, ": grid must be positive, got (", grid_h, ", ", grid_w, ")");
  TORCH_CHECK_VALUE(color == "ycbcr" || color == "rgb", op, ": color must be \"ycbcr\" or \"rgb\", got \"", color,
                    "\"");
  const char* names[2] = {"height", "width"};
  const int64_t sizes[2] = {height, width}, grid[2] = {grid_h, grid_w};
  for (int a = 0; a < 2; ++a) {
    const bool fits = sizes[a] > 0 && grid[a] <= sizes[a] && sizes[a] % (grid[a] << levels) == 0;
    TORCH_CHECK_VALUE(fits, op, ": image ", names[a], " ", sizes[a], " must be a positive multiple of 2**levels * grid",
                      " = 2**", levels, " * ", grid[a]);
  }
  return color == "ycbcr";
}

void check_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), op, ": ", name,
                    " must be a CPU or CUDA tensor, got device ", t.device());
#ifndef WAVECLIP_WITH_CUDA
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is a CUDA tensor but the extension was built without CUDA");
#endif
}

void check_float(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* shape) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  check_device(op, name, t);
}

void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type());
}

// An index tensor (cache_lens, batch_index) of shape (B,) read to the host as int64.
std::vector<int64_t> host_index(const char* name, const at::Tensor& t, int64_t batch, const at::Tensor& q) {
  constexpr const char* op = "attention_with_kv_append";
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                   " must hold int32 or int64 values, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, op, ": ", name, " must have shape (", batch, ",), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  const at::Tensor h = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = h.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + batch);
}

}  // namespace

bool check_tokenize(const at::Tensor& images, int64_t levels, int64_t grid_h, int64_t grid_w, const std::string& color,
                    at::ScalarType out_dtype) {
  constexpr const char* op = "wavelet_tokenize";
  check_float(op, "images", images, 4, "(B, 3, H, W)");
  TORCH_CHECK_VALUE(images.size(1) == 3, op, ": images must have 3 channels (B, 3, H, W), got ", images.sizes());
  TORCH_CHECK_TYPE(is_float_type(out_dtype), op, ": out_dtype must be float16, bfloat16, float32 or float64, got ",
                   out_dtype);
  return check_common(op, levels, grid_h, grid_w, color, images.size(2), images.size(3));
}

bool check_detokenize(const std::vector<at::Tensor>& tokens, int64_t levels, int64_t grid_h, int64_t grid_w,
                      const std::string& color, int64_t height, int64_t width) {
  constexpr const char* op = "wavelet_detokenize";
  const bool ycbcr = check_common(op, levels, grid_h, grid_w, color, height, width);
  TORCH_CHECK_VALUE(static_cast<int64_t>(tokens.size()) == levels + 1, op, ": tokens must hold levels + 1 = ",
                    levels + 1, " tensors, got ", tokens.size());
  const Geometry g(0, height, width, levels, grid_h, grid_w);
  for (int64_t s = 0; s <= levels; ++s) {
    const std::string name = "tokens[" + std::to_string(s) + "]";
    check_float(op, name.c_str(), tokens[s], 3, "(B, Gh*Gw, dim)");
    check_same(op, name.c_str(), tokens[s], "tokens[0]", tokens[0]);
    const bool ok = tokens[s].size(0) == tokens[0].size(0) && tokens[s].size(1) == g.cells() &&
                    tokens[s].size(2) == g.dim(s);
    TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape (", tokens[0].size(0), ", ", g.cells(), ", ", g.dim(s),
                      ") for image size (", height, ", ", width, "), got ", tokens[s].sizes());
  }
  return ycbcr;
}

void check_kv_append_tensors(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                             const at::Tensor& k_cache, const at::Tensor& v_cache) {
  constexpr const char* op = "attention_with_kv_append";
  check_float(op, "q", q, 4, "(B, H, n, D)");
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"k_new", &k_new}, {"v_new", &v_new}, {"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (const auto& [name, t] : others) {
    check_float(op, name, *t, 4, name[2] == 'n' ? "(B, H, n, D)" : "(B_cache, H, N_max, D)");
    check_same(op, name, *t, "q", q);
  }
  TORCH_CHECK_VALUE(k_new.sizes() == q.sizes() && v_new.sizes() == q.sizes(), op, ": k_new ", k_new.sizes(),
                    " and v_new ", v_new.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", k_cache.sizes(), " and v_cache ",
                    v_cache.sizes(), " must have one shape");
  TORCH_CHECK_VALUE(k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3), op, ": k_cache ", k_cache.sizes(),
                    " must match q ", q.sizes(), " in heads (dim 1) and head dim (dim 3)");
  TORCH_CHECK_VALUE(q.size(3) >= 1, op, ": the head dim (dim 3) must be at least 1, got q ", q.sizes());
}

namespace {

// [first, last] byte addresses of t's elements; {1, 0} (empty) when it has none.
std::pair<uintptr_t, uintptr_t> span(const at::Tensor& t) {
  if (t.numel() == 0) return {1, 0};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

bool meet(const std::pair<uintptr_t, uintptr_t>& a, const std::pair<uintptr_t, uintptr_t>& b) {
  return a.first <= a.second && b.first <= b.second && a.first <= b.second && b.first <= a.second;
}

// True when two elements of t may share memory (a stride 0, or strides that interleave).
bool self_overlap(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // largest offset reachable through the smaller-stride dims
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += stride * (size - 1);
  }
  return false;
}

}  // namespace

void check_kv_memory(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache) {
  constexpr const char* op = "attention_with_kv_append";
  TORCH_CHECK_VALUE(!self_overlap(k_cache), op, ": k_cache has elements that share memory (strides ",
                    k_cache.strides(), " for shape ", k_cache.sizes(),
                    ", e.g. an expanded view): the append would write one slot twice");
  TORCH_CHECK_VALUE(!self_overlap(v_cache), op, ": v_cache has elements that share memory (strides ",
                    v_cache.strides(), " for shape ", v_cache.sizes(),
                    ", e.g. an expanded view): the append would write one slot twice");
  const auto k_span = span(k_cache), v_span = span(v_cache);
  TORCH_CHECK_VALUE(!meet(k_span, v_span), op,
                    ": k_cache and v_cache share memory: the key and value appends would overwrite each other");
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q", &q}, {"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, t] : inputs) {
    const auto s = span(*t);
    TORCH_CHECK_VALUE(!meet(s, k_span), op, ": ", name, " shares memory with k_cache: the append would change it ",
                      "while it is read; pass a copy (", name, ".clone())");
    TORCH_CHECK_VALUE(!meet(s, v_span), op, ": ", name, " shares memory with v_cache: the append would change it ",
                      "while it is read; pass a copy (", name, ".clone())");
  }
}

void check_plan_bounds(const AppendPlan& plan, const at::Tensor& q, const at::Tensor& k_cache) {
  constexpr const char* op = "attention_with_kv_append";
  const int64_t B = q.size(0), n = q.size(2), B_cache = k_cache.size(0), n_max = k_cache.size(2);
  TORCH_CHECK_VALUE(static_cast<int64_t>(plan.lens.size()) == B && static_cast<int64_t>(plan.rows.size()) == B, op,
                    ": the plan has ", plan.lens.size(), " lengths and ", plan.rows.size(), " rows for a batch of ",
                    B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = plan.rows[b], c = plan.lens[b];
    TORCH_CHECK_VALUE(r >= 0 && r < B_cache, op, ": batch_index[", b, "] = ", r, " must lie in [0, ", B_cache, ")");
    TORCH_CHECK_VALUE(c >= 0, op, ": cache_lens[", b, "] = ", c, " must be >= 0");
    TORCH_CHECK_VALUE(c <= n_max - n, op, ": cache overflow: row ", b, " (cache row ", r, ") has cache_lens=", c,
                      ", appending ", n, " needs ", c, " + ", n, " slots but N_max=", n_max);
  }
}

AppendPlan check_kv_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                           const std::optional<at::Tensor>& batch_index) {
  constexpr const char* op = "attention_with_kv_append";
  check_kv_append_tensors(q, k_new, v_new, k_cache, v_cache);
  check_kv_memory(q, k_new, v_new, k_cache, v_cache);
  const int64_t B = q.size(0), B_cache = k_cache.size(0);

  AppendPlan plan;
  plan.lens = host_index("cache_lens", cache_lens, B, q);
  if (batch_index.has_value()) {
    plan.rows = host_index("batch_index", *batch_index, B, q);
    std::set<int64_t> seen;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = plan.rows[b];
      TORCH_CHECK_VALUE(r >= 0 && r < B_cache, op, ": batch_index[", b, "] = ", r, " must lie in [0, ", B_cache,
                        ")");
      TORCH_CHECK_VALUE(seen.insert(r).second, op, ": batch_index has the cache row ", r,
                        " twice: two appends would race on one row");
    }
  } else {
    TORCH_CHECK_VALUE(B <= B_cache, op, ": q has batch ", B, " but the caches hold ", B_cache,
                      " rows; pass batch_index");
    for (int64_t b = 0; b < B; ++b) plan.rows.push_back(b);
  }
  check_plan_bounds(plan, q, k_cache);
  return plan;
}

namespace {

// softmax(q k^T * scale) v for one group of rows: SDPA's fastest backend on CUDA; on the CPU, where
// torch exports no BLAS for attention_cpu.cpp, ATen's matmul + softmax composition (SDPA's math path).
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  if (q.is_cpu()) return std::get<0>(at::_scaled_dot_product_attention_math(q, k, v, {}, 0.0, false, {}, scale));
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale);
}

// Attention of q to each row's prefix [0, c+n) of the (already written) caches, on views of the
// caches (nothing is copied): one call when every row has the same length and the rows are
// consecutive, else one call per row.
at::Tensor attend_prefixes(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const AppendPlan& plan, double scale) {
  const int64_t B = q.size(0), n = q.size(2);
  if (B == 0 || n == 0) return at::empty(q.sizes(), q.options());
  bool uniform = true;
  for (int64_t b = 0; b < B; ++b) uniform = uniform && plan.lens[b] == plan.lens[0] && plan.rows[b] == plan.rows[0] + b;
  if (uniform) {
    const int64_t len = plan.lens[0] + n;
    const at::Tensor k = k_cache.narrow(0, plan.rows[0], B).narrow(2, 0, len);
    const at::Tensor v = v_cache.narrow(0, plan.rows[0], B).narrow(2, 0, len);
    return attend(q, k, v, scale).contiguous();
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = plan.lens[b] + n;
    const at::Tensor k = k_cache.narrow(0, plan.rows[b], 1).narrow(2, 0, len);
    const at::Tensor v = v_cache.narrow(0, plan.rows[b], 1).narrow(2, 0, len);
    out.narrow(0, b, 1).copy_(attend(q.narrow(0, b, 1), k, v, scale));
  }
  return out;
}

#ifdef WAVECLIP_WITH_CUDA
// ------------------------------------------------------------------------------ CUDA glue

cuda::Dtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::Dtype::kHalf;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case at::kFloat:
      return cuda::Dtype::kFloat;
    default:
      return cuda::Dtype::kDouble;
  }
}

void check_cuda_levels(const char* op, const Geometry& g) {
  TORCH_CHECK_VALUE(g.levels + 1 <= cuda::kMaxStages, op, ": the CUDA kernels support at most ",
                    cuda::kMaxStages - 1, " levels, got ", g.levels);
  // In-tile and in-token indices are int32 in the kernels.
  TORCH_CHECK_VALUE(g.dim(g.levels) < (int64_t(1) << 31), op, ": a token of ", g.dim(g.levels),
                    " features is too large for the CUDA kernels (at most 2**31 - 1)");
}

std::vector<at::Tensor> wavelet_tokenize_cuda(const at::Tensor& images, const Geometry& g, bool ycbcr,
                                              at::ScalarType out_dtype) {
  check_cuda_levels("wavelet_tokenize", g);
  const c10::cuda::CUDAGuard guard(images.device());
  const at::ScalarType in_type = images.scalar_type();
  // The kernel writes the input dtype or the compute dtype; any other out_dtype is a cast of the latter.
  const at::ScalarType acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType kernel_out = out_dtype == in_type ? in_type : acc_type;
  std::vector<at::Tensor> out;
  for (int64_t s = 0; s <= g.levels; ++s)
    out.push_back(at::empty({g.batch, g.cells(), g.dim(s)}, images.options().dtype(kernel_out)));
  if (g.batch > 0) {
    cuda::TokenizeParams p{};
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
    cuda::tokenize(p, cuda_dtype(in_type), cuda_dtype(kernel_out), g.batch, c10::cuda::getCurrentCUDAStream());
  }
  if (kernel_out != out_dtype)
    for (auto& t : out) t = t.to(out_dtype);
  return out;
}

at::Tensor wavelet_detokenize_cuda(const std::vector<at::Tensor>& tokens, const Geometry& g, bool ycbcr) {
  check_cuda_levels("wavelet_detokenize", g);
  const c10::cuda::CUDAGuard guard(tokens[0].device());
  at::Tensor image = at::empty({g.batch, 3, g.height, g.width}, tokens[0].options());
  if (g.batch == 0) return image;
  cuda::DetokenizeParams p{};
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
  cuda::detokenize(p, cuda_dtype(image.scalar_type()), g.batch, c10::cuda::getCurrentCUDAStream());
  return image;
}

cuda::ScatterSide scatter_side(const at::Tensor& src, const at::Tensor& dst) {
  cuda::ScatterSide side{static_cast<const char*>(src.const_data_ptr()), static_cast<char*>(dst.data_ptr()), {}, {}};
  for (int i = 0; i < 4; ++i) {
    side.s[i] = src.stride(i);
    side.d[i] = dst.stride(i);
  }
  return side;
}

void kv_scatter_cuda(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const AppendPlan& plan) {
  if (k_new.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(k_new.device());
  const int64_t B = k_new.size(0);
  // (2, B) int64: the validated lens, then the rows, copied to the device.
  at::Tensor host = at::empty({2, B}, at::TensorOptions().dtype(at::kLong));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    h[b] = plan.lens[b];
    h[B + b] = plan.rows[b];
  }
  const at::Tensor index = host.to(k_new.device());
  const int64_t* lens = index.const_data_ptr<int64_t>();
  cuda::kv_scatter(scatter_side(k_new, k_cache), scatter_side(v_new, v_cache), lens, lens + B, B, k_new.size(1),
                   k_new.size(2), k_new.size(3), k_new.element_size(), c10::cuda::getCurrentCUDAStream());
}
#endif

// ------------------------------------------------------------------------------ Python entry points

// images: (B, 3, H, W) -> L+1 tensors (B, Gh*Gw, dim_s) of out_dtype, coarse to fine.
std::vector<at::Tensor> wavelet_tokenize(const at::Tensor& images, int64_t levels, int64_t grid_h, int64_t grid_w,
                                         const std::string& color, at::ScalarType out_dtype) {
  const bool ycbcr = check_tokenize(images, levels, grid_h, grid_w, color, out_dtype);
  const Geometry g(images.size(0), images.size(2), images.size(3), levels, grid_h, grid_w);
#ifdef WAVECLIP_WITH_CUDA
  if (images.is_cuda()) return wavelet_tokenize_cuda(images, g, ycbcr, out_dtype);
#endif
  return wavelet_tokenize_cpu(images, g, ycbcr, out_dtype);
}

// tokens: L+1 tensors (B, Gh*Gw, dim_s), coarse to fine -> (B, 3, H, W) in the tokens' dtype.
at::Tensor wavelet_detokenize(const std::vector<at::Tensor>& tokens, int64_t levels, int64_t grid_h, int64_t grid_w,
                              const std::string& color, int64_t height, int64_t width) {
  const bool ycbcr = check_detokenize(tokens, levels, grid_h, grid_w, color, height, width);
  const Geometry g(tokens[0].size(0), height, width, levels, grid_h, grid_w);
#ifdef WAVECLIP_WITH_CUDA
  if (tokens[0].is_cuda()) return wavelet_detokenize_cuda(tokens, g, ycbcr);
#endif
  return wavelet_detokenize_cpu(tokens, g, ycbcr);
}

// Writes the new keys/values, then attends: the CPU kernels, or ATen's math path where torch exports no BLAS.
at::Tensor append_and_attend(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const AppendPlan& plan,
                             double scale) {
#ifdef WAVECLIP_WITH_CUDA
  if (q.is_cuda()) {
    kv_scatter_cuda(k_new, v_new, k_cache, v_cache, plan);
    return attend_prefixes(q, k_cache, v_cache, plan, scale);
  }
#endif
  kv_scatter_cpu(k_new, v_new, k_cache, v_cache, plan);
  if (cpu_attention_available()) return attend_prefixes_cpu(q, k_cache, v_cache, plan, scale);
  return attend_prefixes(q, k_cache, v_cache, plan, scale);
}

// q, k_new, v_new: (B, H, n, D); k_cache, v_cache: (B_cache, H, N_max, D), written in place at
// [cache_lens[b], cache_lens[b] + n) of row batch_index[b] (default b) -> (B, H, n, D).
at::Tensor attention_with_kv_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                    const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& cache_lens, const std::optional<at::Tensor>& batch_index,
                                    double scale) {
  const AppendPlan plan = check_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index);
  return append_and_attend(q, k_new, v_new, k_cache, v_cache, plan, scale);
}

// The same with lengths and rows already validated on the host (distinct rows): no index tensor is
// read; the tensors' shapes and the plan's bounds are checked again (O(B), before anything is written).
at::Tensor attention_with_kv_append_planned(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                                            std::vector<int64_t> lens, std::vector<int64_t> rows, double scale) {
  check_kv_append_tensors(q, k_new, v_new, k_cache, v_cache);
  check_kv_memory(q, k_new, v_new, k_cache, v_cache);
  const AppendPlan plan{std::move(lens), std::move(rows)};
  check_plan_bounds(plan, q, k_cache);
  return append_and_attend(q, k_new, v_new, k_cache, v_cache, plan, scale);
}

// q, k, v: (B, H, N, D) -> (out (B, H, N, D), lse (B, H, N) or empty): a query of block i attends the keys
// of blocks <= i; lse, each row's log-sum-exp, only when with_lse.
std::tuple<at::Tensor, at::Tensor> block_causal_attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const std::vector<int64_t>& block_sizes, double scale,
                                                          bool with_lse) {
  constexpr const char* op = "block_causal_attention";
  check_float(op, "q", q, 4, "(B, H, N, D)");
  check_float(op, "k", k, 4, "(B, H, N, D)");
  check_float(op, "v", v, 4, "(B, H, N, D)");
  check_same(op, "k", k, "q", q);
  check_same(op, "v", v, "q", q);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(),
                    " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(q.size(3) >= 1, op, ": the head dim (dim 3) must be at least 1, got q ", q.sizes());
  TORCH_CHECK(q.is_cpu(), op, ": the extension has no CUDA block_causal_attention (use the Triton kernel)");
  int64_t total = 0;
  for (const int64_t s : block_sizes) {
    TORCH_CHECK_VALUE(s > 0, op, ": block sizes must be positive, got ", block_sizes);
    total += s;
  }
  TORCH_CHECK_VALUE(total == q.size(2), op, ": block sizes ", block_sizes, " must sum to N=", q.size(2));
  return block_causal_attention_cpu(q, k, v, block_sizes, scale, with_lse);
}

bool has_cuda() {
#ifdef WAVECLIP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace waveclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;
  m.doc() =
      "waveclip CPU (OpenMP) and CUDA kernels: wavelet tokenizer, its inverse, block-causal attention (CPU), "
      "attention with KV append";
  m.def("wavelet_tokenize", &waveclip::wavelet_tokenize, release(), py::arg("images"), py::arg("levels"),
        py::arg("grid_h"), py::arg("grid_w"), py::arg("color"), py::arg("out_dtype"));
  m.def(
      "cpu_tokenizer_kernel",
      [](const at::Tensor& images, int64_t levels, int64_t grid_h, int64_t grid_w, at::ScalarType out_dtype) {
        waveclip::check_tokenize(images, levels, grid_h, grid_w, "rgb", out_dtype);
        const waveclip::Geometry g(images.size(0), images.size(2), images.size(3), levels, grid_h, grid_w);
        return waveclip::cpu_tokenizer_kernel(images, g, out_dtype);
      },
      py::arg("images"), py::arg("levels"), py::arg("grid_h"), py::arg("grid_w"), py::arg("out_dtype"),
      "Which CPU tokenizer kernel these images take: \"avx512\", \"avx512-stream\" or \"generic\".");
  m.def("wavelet_detokenize", &waveclip::wavelet_detokenize, release(), py::arg("tokens"), py::arg("levels"),
        py::arg("grid_h"), py::arg("grid_w"), py::arg("color"), py::arg("height"), py::arg("width"));
  m.def(
      "color_matrix",
      [](bool ycbcr, bool inverse) {
        double mm[3][3];
        waveclip::color_matrix(ycbcr, inverse, mm);
        std::vector<std::vector<double>> rows(3, std::vector<double>(3));
        for (int i = 0; i < 3; ++i)
          for (int k = 0; k < 3; ++k) rows[i][k] = mm[i][k];
        return rows;
      },
      py::arg("ycbcr"), py::arg("inverse"), "The 3x3 colour matrix of the kernels (csrc/waveclip.h), row-major.");
  m.def(
      "stage_geometry",
      [](int64_t levels, int64_t grid_h, int64_t grid_w, int64_t height, int64_t width) {
        const waveclip::Geometry g(0, height, width, levels, grid_h, grid_w);
        std::vector<std::vector<int64_t>> stages;  // (channels, patch height, patch width, dim) per stage
        for (int64_t s = 0; s <= levels; ++s) stages.push_back({g.channels(s), g.patch_h(s), g.patch_w(s), g.dim(s)});
        return stages;
      },
      py::arg("levels"), py::arg("grid_h"), py::arg("grid_w"), py::arg("height"), py::arg("width"),
      "Every stage's (channels, patch height, patch width, token dim) as the kernels compute them.");
  m.def("attention_with_kv_append", &waveclip::attention_with_kv_append, release(), py::arg("q"), py::arg("k_new"),
        py::arg("v_new"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_lens"), py::arg("batch_index"),
        py::arg("scale"));
  m.def("attention_with_kv_append_planned", &waveclip::attention_with_kv_append_planned, release(), py::arg("q"),
        py::arg("k_new"), py::arg("v_new"), py::arg("k_cache"), py::arg("v_cache"), py::arg("lens"), py::arg("rows"),
        py::arg("scale"));
  m.def("block_causal_attention", &waveclip::block_causal_attention, release(), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("block_sizes"), py::arg("scale"), py::arg("with_lse"));
  m.def("cpu_attention_available", &waveclip::cpu_attention_available,
        "Whether the CPU attention kernels run (the BLAS of this torch is exported).");
  m.def("has_cuda", &waveclip::has_cuda, "Whether this build includes the CUDA kernels.");
}
