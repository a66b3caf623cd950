// The worker's own CUDA kernels, compiled to PTX by build.rs when the `cuda` feature is on
// and loaded through candle's custom-module cache (see `fused.rs`, which also holds the CPU
// versions of the same functions that CI tests).
//
// Each kernel exists because the same work as plain candle ops takes several passes over
// memory and one launch per pass (and, in candle's backward, a zero tensor and an add per
// input of every op): the attention softmax (scale, causal mask, softmax and their backward),
// RMSNorm, RoPE, SwiGLU's gate, the MoE router's balance loss, and the flat AdamW update
// with its gradient norm.

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_d(double x) { return x; }
__device__ __forceinline__ double to_d(float x) { return (double)x; }
__device__ __forceinline__ double to_d(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Causal softmax over rows of length t: rows are [.., t(query), t(key)] flattened, so row r
// is query i = r % t and keys j <= i are visible. p[j] = exp(scale*s[j] - max) / sum over
// visible j, 0 for j > i. With causal == 0 every entry of a row is visible (a plain softmax
// over the last dimension, e.g. the MoE router's). One warp per row, math in f32.
template <typename T>
__device__ void causal_softmax_fwd(const T *s, T *p, int64_t rows, int t, float scale,
                                   int causal) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  int i = causal ? (int)(row % t) : t - 1;
  const T *src = s + row * t;
  T *dst = p + row * t;
  float mx = -INFINITY;
  for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, to_f(src[j]) * scale);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int j = lane; j <= i; j += 32) sum += expf(to_f(src[j]) * scale - mx);
  sum = warp_sum(sum);
  float inv = 1.f / sum;
  for (int j = lane; j < t; j += 32) {
    float v = j <= i ? expf(to_f(src[j]) * scale - mx) * inv : 0.f;
    dst[j] = from_f<T>(v);
  }
}

// Backward of the above with respect to s: ds[j] = scale * p[j] * (dp[j] - sum_k p[k] dp[k]).
template <typename T>
__device__ void causal_softmax_bwd(const T *p, const T *dp, T *ds, int64_t rows, int t,
                                   float scale, int causal) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  int i = causal ? (int)(row % t) : t - 1;
  const T *pr = p + row * t;
  const T *g = dp + row * t;
  T *out = ds + row * t;
  float dot = 0.f;
  for (int j = lane; j <= i; j += 32) dot += to_f(pr[j]) * to_f(g[j]);
  dot = warp_sum(dot);
  for (int j = lane; j < t; j += 32) {
    float v = j <= i ? scale * to_f(pr[j]) * (to_f(g[j]) - dot) : 0.f;
    out[j] = from_f<T>(v);
  }
}

// The MoE router's balance loss, scale * sum over p: [n, e] of p[t, j] * counts[j] (one
// block; the experts' chosen counts u32), and its gradient dp[t, j] = g * scale * counts[j]
// with the loss's gradient g read on the device. f32 arithmetic.
template <typename T>
__device__ void balance_loss_fwd(const T *p, const uint32_t *counts, T *out, int64_t n, int e,
                                 float scale) {
  __shared__ float sums[32];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n * e; i += blockDim.x)
    acc += to_f(p[i]) * (float)counts[i % e];
  acc = warp_sum(acc);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < (int)(blockDim.x / 32) ? sums[lane] : 0.f;
    acc = warp_sum(acc);
    if (lane == 0) out[0] = from_f<T>(acc * scale);
  }
}

template <typename T>
__device__ void balance_loss_bwd(const T *g, const uint32_t *counts, T *dp, int64_t n, int e,
                                 float scale) {
  float gs = to_f(g[0]) * scale;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n * e;
       i += (int64_t)gridDim.x * blockDim.x)
    dp[i] = from_f<T>(gs * (float)counts[i % e]);
}

extern "C" __global__ void balance_loss_fwd_f32(const float *p, const uint32_t *counts,
                                                float *out, int64_t n, int e, float scale) {
  balance_loss_fwd<float>(p, counts, out, n, e, scale);
}
extern "C" __global__ void balance_loss_bwd_f32(const float *g, const uint32_t *counts,
                                                float *dp, int64_t n, int e, float scale) {
  balance_loss_bwd<float>(g, counts, dp, n, e, scale);
}

// The sum of every thread's acc over the block, into partial[blockIdx.x] (blockDim.x a
// multiple of 32); every thread of the block calls it.
__device__ void block_partial_sum(double acc, double *partial) {
  __shared__ double warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    int nw = blockDim.x / 32;
    acc = lane < nw ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) partial[blockIdx.x] = acc;
  }
}

// Per-block partial sums of squares in f64 (grid-stride); the caller sums the partials.
template <typename T>
__device__ void sum_squares(const T *x, double *partial, int64_t n) {
  double acc = 0.0;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
       k += (int64_t)gridDim.x * blockDim.x) {
    double v = to_d(x[k]);
    acc += v * v;
  }
  block_partial_sum(acc, partial);
}

// One AdamW step over flat buffers. mv holds m then v ([2n]); out gets the new theta, m and
// v ([3n]). k = {clip*(1-b1), b1, clip^2*(1-b2), b2, 1/bc2, eps, lr/bc1, -lr*wd}; decay[j] is
// 1 for elements of matrices and 0 for vectors. Same operation order as the tensor version
// in optim.rs.
template <typename T>
__device__ void adamw_flat(const T *theta, const T *g, const T *mv, const T *decay, T *out,
                           int64_t n, const T k0, const T k1, const T k2, const T k3,
                           const T k4, const T k5, const T k6, const T k7) {
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n;
       j += (int64_t)gridDim.x * blockDim.x) {
    T gj = g[j];
    T m = mv[j] * k1 + gj * k0;
    T v = mv[n + j] * k3 + (gj * gj) * k2;
    T denom = sqrt(v * k4) + k5;
    T update = (m / denom) * k6;
    T dec = decay[j] * k7 + (T)1;
    out[j] = theta[j] * dec - update;
    out[n + j] = m;
    out[2 * n + j] = v;
  }
}

#define SOFTMAX(NAME, T)                                                                     \
  extern "C" __global__ void causal_softmax_fwd_##NAME(const T *s, T *p, int64_t rows,      \
                                                       int t, float scale, int causal) {    \
    causal_softmax_fwd<T>(s, p, rows, t, scale, causal);                                    \
  }                                                                                          \
  extern "C" __global__ void causal_softmax_bwd_##NAME(const T *p, const T *dp, T *ds,      \
                                                       int64_t rows, int t, float scale,    \
                                                       int causal) {                        \
    causal_softmax_bwd<T>(p, dp, ds, rows, t, scale, causal);                               \
  }
SOFTMAX(f32, float)
SOFTMAX(bf16, __nv_bfloat16)

#define SUMSQ(NAME, T)                                                                       \
  extern "C" __global__ void sum_squares_##NAME(const T *x, double *partial, int64_t n) {   \
    sum_squares<T>(x, partial, n);                                                          \
  }
SUMSQ(f32, float)
SUMSQ(f64, double)
SUMSQ(bf16, __nv_bfloat16)

#define ADAMW(NAME, T)                                                                       \
  extern "C" __global__ void adamw_flat_##NAME(                                             \
      const T *theta, const T *g, const T *mv, const T *decay, T *out, int64_t n, T k0,     \
      T k1, T k2, T k3, T k4, T k5, T k6, T k7) {                                           \
    adamw_flat<T>(theta, g, mv, decay, out, n, k0, k1, k2, k3, k4, k5, k6, k7);             \
  }
ADAMW(f32, float)
ADAMW(f64, double)

// Multi-tensor optimizer kernels: one launch over every parameter of the model, each a
// separate buffer, instead of concatenating the gradients and the weights into flat buffers
// and scattering the result back (about four launches per parameter, ~1,500 on `base`).
// `tab` holds MT_FIELDS int64 per tensor: the address of the f32 master, of the gradient
// (0: no gradient, read as zeros), of the compute copy to refresh (0: none), the element
// count, the tensor's offset in the global index space (ascending, tensors back to back),
// and 1 where weight decay applies. Block b covers global indices [b*per, (b+1)*per).
#define MT_FIELDS 6

__device__ __forceinline__ int mt_find(const int64_t *tab, int ntens, int64_t j) {
  int lo = 0, hi = ntens - 1;  // the last tensor whose offset is <= j
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (tab[mid * MT_FIELDS + 4] <= j) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float to_f32_any(float x) { return x; }
__device__ __forceinline__ float to_f32_any(__nv_bfloat16 x) { return __bfloat162float(x); }

// Four consecutive elements as f32, and back: one 16-byte access for f32, 8 for bf16.
__device__ __forceinline__ void load4(const float *p, float *x) {
  float4 v = *(const float4 *)p;
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16 *p, float *x) {
  uint2 raw = *(const uint2 *)p;
  float2 a = __bfloat1622float2(*(const __nv_bfloat162 *)&raw.x);
  float2 b = __bfloat1622float2(*(const __nv_bfloat162 *)&raw.y);
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
__device__ __forceinline__ void store4(float *p, const float *x) {
  *(float4 *)p = make_float4(x[0], x[1], x[2], x[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16 *p, const float *x) {
  __nv_bfloat162 a = __floats2bfloat162_rn(x[0], x[1]);
  __nv_bfloat162 b = __floats2bfloat162_rn(x[2], x[3]);
  uint2 raw;
  raw.x = *(const uint32_t *)&a;
  raw.y = *(const uint32_t *)&b;
  *(uint2 *)p = raw;
}

// W consecutive elements (1, or 4 with load4/store4's vector accesses) as f32, and back.
template <int W, typename T> __device__ __forceinline__ void load_w(const T *p, float *x) {
  if constexpr (W == 4) load4(p, x);
  else x[0] = to_f(*p);
}
template <int W, typename T> __device__ __forceinline__ void store_w(T *p, const float *x) {
  if constexpr (W == 4) store4(p, x);
  else *p = from_f<T>(x[0]);
}

// Where a 4-element group starts for a pointer to element 0 of a tensor: the element offset
// from the previous group boundary of its size (0..3), or -1 if the pointer is not even
// aligned to one element.
template <typename T> __device__ __forceinline__ int phase4(const T *p) {
  uintptr_t a = (uintptr_t)p;
  return a % sizeof(T) ? -1 : (int)((a / sizeof(T)) % 4);
}

// Per-block partial sums of the squared gradients, in f64.
template <typename G>
__device__ void mt_sum_squares(const int64_t *tab, int ntens, int64_t total, int64_t per,
                               double *partial) {
  int64_t start = (int64_t)blockIdx.x * per;
  int64_t end = start + per < total ? start + per : total;
  double acc = 0.0;
  if (start < end) {
    for (int t = mt_find(tab, ntens, start); t < ntens && tab[t * MT_FIELDS + 4] < end; ++t) {
      const G *g = (const G *)tab[t * MT_FIELDS + 1];
      int64_t off = tab[t * MT_FIELDS + 4], n = tab[t * MT_FIELDS + 3];
      if (g == nullptr) continue;
      int64_t lo = start > off ? start : off, hi = end < off + n ? end : off + n;
      // Local [a, b); a vector body [va, vb) of 4-element groups where g is element-aligned.
      int64_t a = lo - off, b = hi - off, va = b, vb = b;
      int ph = phase4(g);
      if (ph >= 0) {
        va = a + (4 - (int64_t)((ph + a) % 4)) % 4;
        if (va > b) va = b;
        vb = va + (b - va) / 4 * 4;
      }
      for (int64_t i = threadIdx.x; i < (va - a) + (b - vb); i += blockDim.x) {
        int64_t l = i < va - a ? a + i : vb + (i - (va - a));
        double v = (double)to_f32_any(g[l]);
        acc += v * v;
      }
      for (int64_t l = va + 4 * (int64_t)threadIdx.x; l < vb; l += 4 * (int64_t)blockDim.x) {
        float x[4];
        load4(g + l, x);
#pragma unroll
        for (int q = 0; q < 4; ++q) acc += (double)x[q] * (double)x[q];
      }
    }
  }
  block_partial_sum(acc, partial);
}

// The update of one element: same constants and operation order as adamw_flat.
__device__ __forceinline__ float adamw_one(float th, float gj, float &m, float &v, float mask,
                                           float k0, float k1, float k2, float k3, float k4,
                                           float k5, float k6, float k7) {
  m = m * k1 + gj * k0;
  v = v * k3 + (gj * gj) * k2;
  float denom = sqrtf(v * k4) + k5;
  float update = (m / denom) * k6;
  float dec = mask * k7 + 1.f;
  return th * dec - update;
}

// One AdamW step in place: masters (f32), the moments mv ([2 * total]: m then v, at each
// element's global index) and the compute copies. Where every stream of a tensor (master,
// gradient, copy, m, v) starts at the same phase of a 4-element group, the body moves four
// elements a thread with vector loads and stores: the scalar loop kept too few bytes in
// flight and reached about 45% of the memory bandwidth.
template <typename G, typename C>
__device__ void mt_adamw(const int64_t *tab, int ntens, int64_t total, int64_t per, float *mv,
                         float k0, float k1, float k2, float k3, float k4, float k5, float k6,
                         float k7) {
  int64_t start = (int64_t)blockIdx.x * per;
  int64_t end = start + per < total ? start + per : total;
  if (start >= end) return;
  for (int t = mt_find(tab, ntens, start); t < ntens && tab[t * MT_FIELDS + 4] < end; ++t) {
    const int64_t *e = tab + t * MT_FIELDS;
    float *p = (float *)e[0];
    const G *g = (const G *)e[1];
    C *c = (C *)e[2];
    int64_t n = e[3], off = e[4];
    float mask = e[5] ? 1.f : 0.f;
    int64_t lo = start > off ? start : off, hi = end < off + n ? end : off + n;
    // Local indices [a, b) of this block's part of the tensor.
    int64_t a = lo - off, b = hi - off;
    int ph = phase4(p);
    int pm = phase4(mv + off), pv = phase4(mv + total + off);
    bool vec = ph >= 0 && pm == ph && pv == ph && (g == nullptr || phase4(g) == ph) &&
               (c == nullptr || phase4(c) == ph);
    // Vector body [va, vb): group-aligned for every stream; scalar elements before and after.
    int64_t va = b, vb = b;
    if (vec) {
      va = a + (4 - (int64_t)((ph + a) % 4)) % 4;
      if (va > b) va = b;
      vb = va + (b - va) / 4 * 4;
    }
    // The scalar elements: [a, va) then [vb, b) (all of [a, b) without the vector body).
    for (int64_t i = threadIdx.x; i < (va - a) + (b - vb); i += blockDim.x) {
      int64_t l = i < va - a ? a + i : vb + (i - (va - a));
      int64_t j = l + off;
      float gj = g == nullptr ? 0.f : to_f32_any(g[l]);
      float m = mv[j], v = mv[total + j];
      float th = adamw_one(p[l], gj, m, v, mask, k0, k1, k2, k3, k4, k5, k6, k7);
      p[l] = th;
      mv[j] = m;
      mv[total + j] = v;
      if (c != nullptr) c[l] = from_f<C>(th);
    }
    for (int64_t l = va + 4 * (int64_t)threadIdx.x; l < vb; l += 4 * (int64_t)blockDim.x) {
      int64_t j = l + off;
      float th[4], gj[4] = {0.f, 0.f, 0.f, 0.f}, m[4], v[4];
      load4(p + l, th);
      if (g != nullptr) load4(g + l, gj);
      load4(mv + j, m);
      load4(mv + total + j, v);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        th[i] = adamw_one(th[i], gj[i], m[i], v[i], mask, k0, k1, k2, k3, k4, k5, k6, k7);
      store4(p + l, th);
      store4(mv + j, m);
      store4(mv + total + j, v);
      if (c != nullptr) store4(c + l, th);
    }
  }
}

#define MTSUMSQ(NAME, G)                                                                     \
  extern "C" __global__ void mt_sum_squares_##NAME(const int64_t *tab, int ntens,           \
                                                   int64_t total, int64_t per,              \
                                                   double *partial) {                       \
    mt_sum_squares<G>(tab, ntens, total, per, partial);                                     \
  }
MTSUMSQ(f32, float)
MTSUMSQ(bf16, __nv_bfloat16)

#define MTADAMW(NAME, G, C)                                                                  \
  extern "C" __global__ void mt_adamw_##NAME(const int64_t *tab, int ntens, int64_t total,  \
                                             int64_t per, float *mv, float k0, float k1,    \
                                             float k2, float k3, float k4, float k5,        \
                                             float k6, float k7) {                          \
    mt_adamw<G, C>(tab, ntens, total, per, mv, k0, k1, k2, k3, k4, k5, k6, k7);             \
  }
MTADAMW(f32_f32, float, float)
MTADAMW(f32_bf16, float, __nv_bfloat16)
MTADAMW(bf16_f32, __nv_bfloat16, float)
MTADAMW(bf16_bf16, __nv_bfloat16, __nv_bfloat16)

// Rows a block of rms_norm_bwd_w sums (fused.rs: RMS_W_GROUP).
#define RMS_W_GROUP 16

// RMSNorm over rows of length d: y = x * r * w with r = 1 / sqrt(mean(x^2) + eps). One warp
// per row, f32 arithmetic.
template <typename T>
__device__ float row_rms(const T *x, int d, float eps, int lane) {
  float ss = 0.f;
  for (int j = lane; j < d; j += 32) {
    float v = to_f(x[j]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  return rsqrtf(ss / d + eps);
}

template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, int64_t rows, int d, float eps) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T *xr = x + row * d;
  T *yr = y + row * d;
  float r = row_rms(xr, d, eps, lane);
  for (int j = lane; j < d; j += 32) yr[j] = from_f<T>(to_f(xr[j]) * r * to_f(w[j]));
}

// dx[k] = r * (dy[k] w[k] - x[k] r^2 / d * sum_j dy[j] w[j] x[j]).
template <typename T>
__device__ void rms_norm_bwd_x(const T *x, const T *w, const T *dy, T *dx, int64_t rows, int d,
                               float eps) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T *xr = x + row * d;
  const T *g = dy + row * d;
  T *out = dx + row * d;
  float r = row_rms(xr, d, eps, lane);
  float dot = 0.f;
  for (int j = lane; j < d; j += 32) dot += to_f(g[j]) * to_f(w[j]) * to_f(xr[j]);
  dot = warp_sum(dot);
  float c = r * r * dot / d;
  for (int j = lane; j < d; j += 32)
    out[j] = from_f<T>(r * (to_f(g[j]) * to_f(w[j]) - to_f(xr[j]) * c));
}

// Per-row terms of the weight gradient, dy[j] * x[j] * r, in f32 (summed over rows by the
// caller with a matrix product).
template <typename T>
__device__ void rms_norm_bwd_w(const T *x, const T *dy, float *part, int64_t rows, int d,
                               float eps) {
  __shared__ float r[RMS_W_GROUP];
  const int64_t r0 = (int64_t)blockIdx.x * RMS_W_GROUP;
  const int n = (int)min((int64_t)RMS_W_GROUP, rows - r0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = warp; i < n; i += blockDim.x / 32) {
    float v = row_rms(x + (r0 + i) * d, d, eps, lane);
    if (lane == 0) r[i] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float acc = 0.f;
    for (int i = 0; i < n; ++i) {
      int64_t at = (r0 + i) * d + j;
      acc += to_f(dy[at]) * to_f(x[at]) * r[i];
    }
    part[blockIdx.x * d + j] = acc;
  }
}

// The attention heads' split ([B, T, H, hd] rows to [B, H, T, hd]; merge = 0) or merge
// (the reverse; merge = 1), one thread per pair (i, i + hd/2) of an output row, rotated by
// RoPE at the row's position when rotate = 1: y1 = x1 c - x2 s sign, y2 = x1 s sign + x2 c
// (sign = -1 is the backward pass).
// For output row r of the heads' split (merge = 0: output [b, h, t], input [b, t, h]) or
// merge (merge = 1: the reverse), the input row it reads; its position goes to pos.
__device__ __forceinline__ uint32_t heads_source(uint32_t r, int h, int t, int merge,
                                                 uint32_t &pos) {
  if (merge) {
    uint32_t hh = r % (uint32_t)h, rest = r / (uint32_t)h;
    pos = rest % (uint32_t)t;
    return ((rest / (uint32_t)t) * h + hh) * t + pos;
  }
  pos = r % (uint32_t)t;
  uint32_t rest = r / (uint32_t)t;
  uint32_t hh = rest % (uint32_t)h;
  return ((rest / (uint32_t)h) * t + pos) * h + hh;
}

template <typename T>
__device__ void heads(const T *x, const T *cos, const T *sin, T *y, int64_t pairs, int h,
                       int t, int half, int merge, int rotate, float sign) {
  // 32-bit index arithmetic (the caller keeps `pairs` below 2^31): 64-bit divisions made
  // this kernel compute-bound.
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < (uint32_t)pairs;
       k += gridDim.x * blockDim.x) {
    uint32_t i = k % (uint32_t)half;
    uint32_t r = k / (uint32_t)half;  // output row
    uint32_t pos;
    uint32_t src = heads_source(r, h, t, merge, pos);
    const T *xr = x + (int64_t)src * 2 * half;
    T *yr = y + (int64_t)r * 2 * half;
    if (rotate) {
      float c = to_f(cos[pos * half + i]);
      float s = to_f(sin[pos * half + i]) * sign;
      float x1 = to_f(xr[i]), x2 = to_f(xr[half + i]);
      yr[i] = from_f<T>(x1 * c - x2 * s);
      yr[half + i] = from_f<T>(x1 * s + x2 * c);
    } else {
      yr[i] = xr[i];
      yr[half + i] = xr[half + i];
    }
  }
}

// The same with two neighbouring pairs a thread, as 2-element vectors (half even, every row
// and table aligned to two elements): half the threads and their index arithmetic, and
// 4-byte (bf16) or 8-byte (f32) accesses.
__device__ __forceinline__ float2 to_f2(float2 v) { return v; }
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
template <typename V> __device__ __forceinline__ V from_f2(float a, float b);
template <> __device__ __forceinline__ float2 from_f2<float2>(float a, float b) {
  return make_float2(a, b);
}
template <> __device__ __forceinline__ __nv_bfloat162 from_f2<__nv_bfloat162>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

template <typename T, typename V>
__device__ void heads2(const T *x, const T *cos, const T *sin, T *y, int64_t quads, int h,
                       int t, int half, int merge, int rotate, float sign) {
  uint32_t hq = (uint32_t)half / 2;
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < (uint32_t)quads;
       k += gridDim.x * blockDim.x) {
    uint32_t i = (k % hq) * 2;
    uint32_t r = k / hq;  // output row
    uint32_t pos;
    uint32_t src = heads_source(r, h, t, merge, pos);
    const T *xr = x + (int64_t)src * 2 * half;
    T *yr = y + (int64_t)r * 2 * half;
    V a = *(const V *)(xr + i), b = *(const V *)(xr + half + i);
    if (rotate) {
      float2 c = to_f2(*(const V *)(cos + pos * half + i));
      float2 s = to_f2(*(const V *)(sin + pos * half + i));
      s.x *= sign;
      s.y *= sign;
      float2 x1 = to_f2(a), x2 = to_f2(b);
      *(V *)(yr + i) = from_f2<V>(x1.x * c.x - x2.x * s.x, x1.y * c.y - x2.y * s.y);
      *(V *)(yr + half + i) = from_f2<V>(x1.x * s.x + x2.x * c.x, x1.y * s.y + x2.y * c.y);
    } else {
      *(V *)(yr + i) = a;
      *(V *)(yr + half + i) = b;
    }
  }
}

#define HEADS2(NAME, T, V)                                                                   \
  extern "C" __global__ void heads2_##NAME(const T *x, const T *cos, const T *sin, T *y,    \
                                           int64_t quads, int h, int t, int half,           \
                                           int merge, int rotate, float sign) {             \
    heads2<T, V>(x, cos, sin, y, quads, h, t, half, merge, rotate, sign);                   \
  }
HEADS2(f32, float, float2)
HEADS2(bf16, __nv_bfloat16, __nv_bfloat162)

// SwiGLU's gate: y = silu(g) * u, W elements a thread. Element k of y (n in all) reads g and
// u at (k / h) * stride + k % h: h = stride = n for a gate and an input of their own, h half
// a row and stride the row for the two packed side by side in each row of one product's
// output. (h and stride multiples of W, every address aligned to W elements.)
template <typename T, int W>
__device__ void swiglu_fwd(const T *g, const T *u, T *y, int64_t n, int64_t h, int64_t stride) {
  for (int64_t k = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * W; k < n;
       k += (int64_t)gridDim.x * blockDim.x * W) {
    int64_t at = h == n ? k : (k / h) * stride + k % h;
    float a[W], b[W], o[W];
    load_w<W>(g + at, a);
    load_w<W>(u + at, b);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      float sig = 1.f / (1.f + expf(-a[i]));
      o[i] = a[i] * sig * b[i];
    }
    store_w<W>(y + k, o);
  }
}

// Its backward, dg = dy u silu'(g) and du = dy silu(g), written where g and u are read from
// (into dg and du, laid out as g and u are).
template <typename T, int W>
__device__ void swiglu_bwd(const T *g, const T *u, const T *dy, T *dg, T *du, int64_t n,
                           int64_t h, int64_t stride) {
  for (int64_t k = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * W; k < n;
       k += (int64_t)gridDim.x * blockDim.x * W) {
    int64_t at = h == n ? k : (k / h) * stride + k % h;
    float a[W], b[W], d[W], og[W], ou[W];
    load_w<W>(g + at, a);
    load_w<W>(u + at, b);
    load_w<W>(dy + k, d);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      float sig = 1.f / (1.f + expf(-a[i]));
      og[i] = d[i] * b[i] * sig * (1.f + a[i] * (1.f - sig));
      ou[i] = d[i] * a[i] * sig;
    }
    store_w<W>(dg + at, og);
    store_w<W>(du + at, ou);
  }
}

#define ROWOPS(NAME, T)                                                                      \
  extern "C" __global__ void rms_norm_fwd_##NAME(const T *x, const T *w, T *y, int64_t rows, \
                                                 int d, float eps) {                        \
    rms_norm_fwd<T>(x, w, y, rows, d, eps);                                                 \
  }                                                                                          \
  extern "C" __global__ void rms_norm_bwd_x_##NAME(const T *x, const T *w, const T *dy,     \
                                                   T *dx, int64_t rows, int d, float eps) { \
    rms_norm_bwd_x<T>(x, w, dy, dx, rows, d, eps);                                          \
  }                                                                                          \
  extern "C" __global__ void rms_norm_bwd_w_##NAME(const T *x, const T *dy, float *part,    \
                                                   int64_t rows, int d, float eps) {        \
    rms_norm_bwd_w<T>(x, dy, part, rows, d, eps);                                           \
  }                                                                                          \
  extern "C" __global__ void heads_##NAME(const T *x, const T *cos, const T *sin, T *y,     \
                                          int64_t pairs, int h, int t, int half,            \
                                          int merge, int rotate, float sign) {              \
    heads<T>(x, cos, sin, y, pairs, h, t, half, merge, rotate, sign);                       \
  }                                                                                          \
  extern "C" __global__ void swiglu_fwd_##NAME(const T *g, const T *u, T *y, int64_t n,      \
                                               int64_t h, int64_t stride) {                 \
    swiglu_fwd<T, 1>(g, u, y, n, h, stride);                                                \
  }                                                                                          \
  extern "C" __global__ void swiglu_bwd_##NAME(const T *g, const T *u, const T *dy, T *dg,  \
                                               T *du, int64_t n, int64_t h,                 \
                                               int64_t stride) {                            \
    swiglu_bwd<T, 1>(g, u, dy, dg, du, n, h, stride);                                       \
  }                                                                                          \
  extern "C" __global__ void swiglu_fwd4_##NAME(const T *g, const T *u, T *y, int64_t n,     \
                                                int64_t h, int64_t stride) {                \
    swiglu_fwd<T, 4>(g, u, y, n, h, stride);                                                \
  }                                                                                          \
  extern "C" __global__ void swiglu_bwd4_##NAME(const T *g, const T *u, const T *dy, T *dg, \
                                                T *du, int64_t n, int64_t h,                \
                                                int64_t stride) {                           \
    swiglu_bwd<T, 4>(g, u, dy, dg, du, n, h, stride);                                       \
  }
ROWOPS(f32, float)
ROWOPS(bf16, __nv_bfloat16)

// The MoE combine: out[t] = sum_j g[t*k + j] * y[ids[j*n + t]] over the top-k slots j, a slot
// whose id is >= r (dropped, or an expert that did not answer) adding nothing. y: [r, d],
// g: [n, k], ids: [k * n] (slot-major), out: [n, d]. One warp per token, f32 sums.
// A lane moves W consecutive columns (d a multiple of W, y and out aligned to W elements).
template <typename T, int W>
__device__ void moe_combine_fwd(const T *y, const T *g, const uint32_t *ids, T *out,
                                int64_t n, int k, int d, int64_t r) {
  int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (t >= n) return;
  for (int c = lane * W; c < d; c += 32 * W) {
    float acc[W] = {}, v[W];
    for (int j = 0; j < k; ++j) {
      uint32_t id = ids[(int64_t)j * n + t];
      if (id < r) {
        float gate = to_f(g[t * k + j]);
        load_w<W>(y + (int64_t)id * d + c, v);
#pragma unroll
        for (int i = 0; i < W; ++i) acc[i] += gate * v[i];
      }
    }
    store_w<W>(out + t * d + c, acc);
  }
}

// Gradient of y: row i is read by at most one (token, slot), back[i] = j*n + t (>= k*n: by
// none), so dy[i] = g[t*k + j] * dout[t]. One warp per row of y.
template <typename T, int W>
__device__ void moe_combine_bwd_y(const T *dout, const T *g, const uint32_t *back, T *dy,
                                  int64_t n, int k, int d, int64_t r) {
  int64_t i = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (i >= r) return;
  uint32_t b = back[i];
  bool read = (int64_t)b < (int64_t)k * n;
  int64_t t = read ? b % n : 0;
  float gate = read ? to_f(g[t * k + b / n]) : 0.f;
  for (int c = lane * W; c < d; c += 32 * W) {
    float v[W] = {};
    if (read) {
      load_w<W>(dout + t * d + c, v);
#pragma unroll
      for (int q = 0; q < W; ++q) v[q] *= gate;
    }
    store_w<W>(dy + i * d + c, v);
  }
}

// Gradient of g: dg[t*k + j] = dout[t] . y[ids[j*n + t]] (0 for a slot that reads nothing).
// One warp per (token, slot).
template <typename T>
__device__ void moe_combine_bwd_g(const T *dout, const T *y, const uint32_t *ids, T *dg,
                                  int64_t n, int k, int d, int64_t r) {
  int64_t q = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (q >= n * k) return;
  int64_t t = q / k;
  int j = (int)(q % k);
  uint32_t id = ids[(int64_t)j * n + t];
  float acc = 0.f;
  if (id < r) {
    for (int c = lane; c < d; c += 32) acc += to_f(dout[t * d + c]) * to_f(y[(int64_t)id * d + c]);
  }
  acc = warp_sum(acc);
  if (lane == 0) dg[q] = from_f<T>(acc);
}

// The router's gates: c[t*k + j] is the expert of token t's slot j, plus e (the number of
// experts) where that assignment was dropped. g[t*k + j] = p[t, c] / S_t for a kept slot and
// 0 for a dropped one, S_t = sum over all k chosen experts of p[t, c]. One thread per token.
template <typename T>
__device__ void router_gates_fwd(const T *p, const uint32_t *c, T *g, int64_t n, int e,
                                 int k) {
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  T s = (T)0;
  for (int j = 0; j < k; ++j) s += p[t * e + c[t * k + j] % e];
  for (int j = 0; j < k; ++j) {
    uint32_t x = c[t * k + j];
    g[t * k + j] = x < (uint32_t)e ? p[t * e + x] / s : (T)0;
  }
}

// Its backward: dp[t, c_j] = kept_j dg_j / S - (sum_i kept_i dg_i p[c_i]) / S^2 for each
// chosen expert c_j, 0 for the others. One thread per token.
template <typename T>
__device__ void router_gates_bwd(const T *p, const uint32_t *c, const T *dg, T *dp, int64_t n,
                                 int e, int k) {
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  T s = (T)0, a = (T)0;
  for (int j = 0; j < k; ++j) {
    uint32_t x = c[t * k + j];
    s += p[t * e + x % e];
    if (x < (uint32_t)e) a += dg[t * k + j] * p[t * e + x];
  }
  for (int i = 0; i < e; ++i) dp[t * e + i] = (T)0;
  T inv = (T)1 / s;
  for (int j = 0; j < k; ++j) {
    uint32_t x = c[t * k + j];
    T v = -a * inv * inv;
    if (x < (uint32_t)e) v += dg[t * k + j] * inv;
    dp[t * e + x % e] += v;
  }
}

#define MOEOPS(NAME, T)                                                                      \
  extern "C" __global__ void moe_combine_fwd_##NAME(const T *y, const T *g,                 \
                                                    const uint32_t *ids, T *out, int64_t n, \
                                                    int k, int d, int64_t r) {              \
    moe_combine_fwd<T, 1>(y, g, ids, out, n, k, d, r);                                      \
  }                                                                                          \
  extern "C" __global__ void moe_combine_fwd4_##NAME(const T *y, const T *g,                \
                                                     const uint32_t *ids, T *out,           \
                                                     int64_t n, int k, int d, int64_t r) {  \
    moe_combine_fwd<T, 4>(y, g, ids, out, n, k, d, r);                                      \
  }                                                                                          \
  extern "C" __global__ void moe_combine_bwd_y_##NAME(const T *dout, const T *g,            \
                                                      const uint32_t *back, T *dy,          \
                                                      int64_t n, int k, int d, int64_t r) { \
    moe_combine_bwd_y<T, 1>(dout, g, back, dy, n, k, d, r);                                 \
  }                                                                                          \
  extern "C" __global__ void moe_combine_bwd_y4_##NAME(const T *dout, const T *g,           \
                                                       const uint32_t *back, T *dy,         \
                                                       int64_t n, int k, int d,             \
                                                       int64_t r) {                         \
    moe_combine_bwd_y<T, 4>(dout, g, back, dy, n, k, d, r);                                 \
  }                                                                                          \
  extern "C" __global__ void moe_combine_bwd_g_##NAME(const T *dout, const T *y,            \
                                                      const uint32_t *ids, T *dg,           \
                                                      int64_t n, int k, int d, int64_t r) { \
    moe_combine_bwd_g<T>(dout, y, ids, dg, n, k, d, r);                                     \
  }
MOEOPS(f32, float)
MOEOPS(bf16, __nv_bfloat16)

extern "C" __global__ void router_gates_fwd_f32(const float *p, const uint32_t *c, float *g,
                                                int64_t n, int e, int k) {
  router_gates_fwd<float>(p, c, g, n, e, k);
}
extern "C" __global__ void router_gates_bwd_f32(const float *p, const uint32_t *c,
                                                const float *dg, float *dp, int64_t n, int e,
                                                int k) {
  router_gates_bwd<float>(p, c, dg, dp, n, e, k);
}

// Rows gathered by index, a row of zeros for an index >= r: out[i] = x[ids[i]]. A row is
// `words` words of type W (16, 8, 4, 2 or 1 bytes, as wide as the rows' width and both
// addresses allow); blocks of 32 x 8 threads copy eight rows at a time.
template <typename W>
__device__ void gather_rows(const W *x, const uint32_t *ids, W *y, int64_t m, int64_t r,
                            int64_t words) {
  for (int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y; row < m;
       row += (int64_t)gridDim.x * blockDim.y) {
    int64_t id = ids[row];
    W *yr = y + row * words;
    if (id >= r) {
      W zero;
      memset(&zero, 0, sizeof(W));
      for (int64_t c = threadIdx.x; c < words; c += blockDim.x) yr[c] = zero;
    } else {
      const W *xr = x + id * words;
      for (int64_t c = threadIdx.x; c < words; c += blockDim.x) yr[c] = xr[c];
    }
  }
}

#define GATHER(NAME, W)                                                                      \
  extern "C" __global__ void gather_rows_##NAME(const W *x, const uint32_t *ids, W *y,     \
                                                int64_t m, int64_t r, int64_t words) {     \
    gather_rows<W>(x, ids, y, m, r, words);                                                 \
  }
GATHER(w16, uint4)
GATHER(w8, uint2)
GATHER(w4, uint32_t)
GATHER(w2, uint16_t)
GATHER(w1, uint8_t)

// Each token's k experts by router probability, best first, the lower expert winning a tie:
// an arg-max k times, each skipping the experts already taken (fused::topk_host's rule).
extern "C" __global__ void router_topk_f32(const float *p, uint32_t *out, int64_t n, int e,
                                           int k) {
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n;
       t += (int64_t)gridDim.x * blockDim.x) {
    const float *row = p + t * e;
    uint32_t *o = out + t * k;
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int x = 0; x < e; ++x) {
        bool taken = false;
        for (int q = 0; q < j; ++q) taken |= o[q] == (uint32_t)x;
        if (!taken && (best < 0 || row[x] > row[best])) best = x;
      }
      o[j] = (uint32_t)(best < 0 ? 0 : best);
    }
  }
}

// The rows that nsum index lists pick, summed in f32: out[i] = sum_j x[ids[j * m + i]], an
// index >= r reading zeros. Blocks of 32 x 8 threads, eight rows at a time.
// A thread moves W consecutive columns (d a multiple of W, x and y aligned to W elements).
template <typename T, int W>
__device__ void gather_sum(const T *x, const uint32_t *ids, T *y, int64_t m, int64_t r,
                           int64_t d, int nsum) {
  for (int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y; row < m;
       row += (int64_t)gridDim.x * blockDim.y) {
    for (int64_t c = threadIdx.x * W; c < d; c += blockDim.x * W) {
      float acc[W] = {}, v[W];
      for (int j = 0; j < nsum; ++j) {
        int64_t id = ids[j * m + row];
        if (id < r) {
          load_w<W>(x + id * d + c, v);
#pragma unroll
          for (int q = 0; q < W; ++q) acc[q] += v[q];
        }
      }
      store_w<W>(y + row * d + c, acc);
    }
  }
}

#define GATHER_SUM(NAME, T)                                                                  \
  extern "C" __global__ void gather_sum_##NAME(const T *x, const uint32_t *ids, T *y,      \
                                               int64_t m, int64_t r, int64_t d, int nsum) { \
    gather_sum<T, 1>(x, ids, y, m, r, d, nsum);                                             \
  }                                                                                          \
  extern "C" __global__ void gather_sum4_##NAME(const T *x, const uint32_t *ids, T *y,     \
                                                int64_t m, int64_t r, int64_t d,           \
                                                int nsum) {                                 \
    gather_sum<T, 4>(x, ids, y, m, r, d, nsum);                                             \
  }
GATHER_SUM(f32, float)
GATHER_SUM(bf16, __nv_bfloat16)

// MoE routing laid out on the device (fused::route_counts, fused::route_layout). Both run as
// one block of ROUTE_THREADS threads: a layer routes N * k assignments (16,384 on `base`),
// and the layout is a few block-wide scans over them.
#define ROUTE_THREADS 1024
#define ROUTE_MAX_EXPERTS 4096

// Each expert's kept and chosen counts: out = [min(chosen, capacity) (e) | chosen (e)].
// Choices >= e are counted nowhere.
extern "C" __global__ void route_counts(const uint32_t *choice, uint32_t *out, int64_t m,
                                        int e, int64_t capacity) {
  __shared__ uint32_t hist[ROUTE_MAX_EXPERTS];
  for (int x = threadIdx.x; x < e; x += blockDim.x) hist[x] = 0;
  __syncthreads();
  for (int64_t q = threadIdx.x; q < m; q += blockDim.x) {
    uint32_t c = choice[q];
    if (c < (uint32_t)e) atomicAdd(&hist[c], 1u);
  }
  __syncthreads();
  for (int x = threadIdx.x; x < e; x += blockDim.x) {
    uint32_t c = hist[x];
    out[x] = (int64_t)c < capacity ? c : (uint32_t)capacity;
    out[e + x] = c;
  }
}

// Exclusive prefix sum of one value per thread over the block (blockDim.x a multiple of 32,
// at most 1024); every thread of the block must call it.
__device__ uint32_t block_exclusive_scan(uint32_t v, uint32_t *warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  uint32_t x = v;
  for (int o = 1; o < 32; o <<= 1) {
    uint32_t y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    uint32_t s = lane < warps ? warp_sums[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      uint32_t y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    warp_sums[lane] = s;
  }
  __syncthreads();
  uint32_t out = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
  __syncthreads();
  return out;
}

// The index vectors of one MoE layer's batched experts, from each token's choice
// (`choice: [n * k]`, token-major) and route_counts' counts. Capacity keeps an expert's
// first `capacity` assignments in slot-major order (every token's first choice before any
// second choice); expert x's block of `rows` starts at the sum of the earlier blocks, each
// its kept count rounded up to `align` (align 0: every block the largest kept count, at
// least 1), and lists its tokens ascending. out = [gather (rows: the token of each row, n
// for padding) | combine (n * k, slot-major: the row of each slot, rows where dropped) |
// back (rows + 1: the slot j * n + t of each row, n * k for padding and the zero row) |
// gate (n * k, token-major: each slot's expert, plus e where dropped; 2e for a choice that
// is not an expert)]. Two kernels: route_layout_few for up to 32 experts, route_layout for
// any count.
struct RouteOut {
  uint32_t *gather, *combine, *back, *gate;
};

// The blocks' offsets (into off[]), whether any expert has more choices than capacity, and
// the padding everywhere; the caller syncs before using any of it.
__device__ RouteOut route_prologue(const uint32_t *counts, uint32_t *out, int64_t n, int k,
                                   int e, int64_t capacity, int64_t align, int64_t rows,
                                   uint32_t *off, int *over) {
  const int64_t m = n * k;
  RouteOut o{out, out + rows, out + rows + m, out + 2 * rows + 1 + m};
  if (threadIdx.x == 0) {
    uint32_t widest = 1;
    int any_over = 0;
    for (int x = 0; x < e; ++x) {
      widest = max(widest, counts[x]);
      any_over |= (int64_t)counts[e + x] > capacity;
    }
    uint32_t at = 0;
    for (int x = 0; x < e; ++x) {
      off[x] = at;
      at += align > 0 ? (uint32_t)((counts[x] + align - 1) / align * align) : widest;
    }
    *over = any_over;
  }
  for (int64_t p = threadIdx.x; p < rows; p += blockDim.x) {
    o.gather[p] = (uint32_t)n;
    o.back[p] = (uint32_t)m;
  }
  if (threadIdx.x == 0) o.back[rows] = (uint32_t)m;
  return o;
}

// Kept assignment q (token q / k, slot q % k) takes row r. A row past the layout (counts
// that do not match the rows the host sized it for) is skipped: a wrong layout, never a
// write out of bounds.
__device__ __forceinline__ void route_place(const RouteOut &o, int64_t q, uint32_t r, int64_t n,
                                            int k, int64_t rows) {
  if ((int64_t)r >= rows) return;
  int64_t t = q / k, slot = (q % k) * n + t;
  o.gather[r] = (uint32_t)t;
  o.combine[slot] = r;
  o.back[r] = (uint32_t)slot;
}

extern "C" __global__ void route_layout(const uint32_t *choice, const uint32_t *counts,
                                        uint32_t *out, int64_t n, int k, int e,
                                        int64_t capacity, int64_t align, int64_t rows) {
  __shared__ uint32_t off[ROUTE_MAX_EXPERTS];
  __shared__ uint32_t warp_sums[32];
  __shared__ int over;
  const int64_t m = n * k;
  RouteOut o = route_prologue(counts, out, n, k, e, capacity, align, rows, off, &over);
  __syncthreads();
  // Each thread takes one contiguous chunk of the assignments, in slot-major order for the
  // capacity and in token-major order for the positions, so that a scan over threads
  // follows the order.
  const int64_t chunk = (m + blockDim.x - 1) / blockDim.x;
  const int64_t c0 = min(m, (int64_t)threadIdx.x * chunk), c1 = min(m, c0 + chunk);
  if (!over) {
    for (int64_t q = c0; q < c1; ++q) o.gate[q] = choice[q] < (uint32_t)e ? choice[q] : 2 * e;
  } else {
    for (int x = 0; x < e; ++x) {
      uint32_t mine = 0;
      for (int64_t s = c0; s < c1; ++s) mine += choice[(s % n) * k + s / n] == (uint32_t)x;
      uint32_t rank = block_exclusive_scan(mine, warp_sums);
      for (int64_t s = c0; s < c1; ++s) {
        int64_t q = (s % n) * k + s / n;
        if (choice[q] == (uint32_t)x) {
          o.gate[q] = (int64_t)rank < capacity ? x : x + e;
          ++rank;
        }
      }
    }
    for (int64_t s = c0; s < c1; ++s) {
      int64_t q = (s % n) * k + s / n;
      if (choice[q] >= (uint32_t)e) o.gate[q] = 2 * e;
    }
  }
  __syncthreads();
  for (int x = 0; x < e; ++x) {
    uint32_t mine = 0;
    for (int64_t q = c0; q < c1; ++q) mine += o.gate[q] == (uint32_t)x;
    uint32_t r = off[x] + block_exclusive_scan(mine, warp_sums);
    for (int64_t q = c0; q < c1; ++q) {
      if (o.gate[q] == (uint32_t)x) route_place(o, q, r++, n, k, rows);
    }
  }
  for (int64_t q = c0; q < c1; ++q) {
    if (o.gate[q] >= (uint32_t)e) o.combine[(q % k) * n + q / k] = (uint32_t)rows;
  }
}

// For this thread's expert x (-1: none) in a tile of blockDim.x consecutive elements: the
// number of earlier elements of the tile with the same expert, and each expert's count in
// the tile in tot[]. Up to 32 experts and 32 warps; every thread of the block calls it.
__device__ uint32_t tile_rank(int x, int e, uint32_t (*wc)[33], uint32_t *tot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  unsigned peers = __match_any_sync(0xffffffffu, x);
  uint32_t in_warp = __popc(peers & ((1u << lane) - 1u));
  if (lane < e) wc[warp][lane] = 0;
  __syncwarp();
  if (x >= 0 && in_warp == 0) wc[warp][x] = __popc(peers);
  __syncthreads();
  if (warp < e) { // warp w: expert w's counts over the warps, as an exclusive scan
    uint32_t v = lane < warps ? wc[lane][warp] : 0, s = v;
    for (int o = 1; o < 32; o <<= 1) {
      uint32_t y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < warps) wc[lane][warp] = s - v;
    if (lane == 31) tot[warp] = s;
  }
  __syncthreads();
  uint32_t r = x >= 0 ? wc[warp][x] + in_warp : 0;
  __syncthreads();
  return r;
}

// route_layout for up to 32 experts: the assignments pass through the block a tile at a
// time (a warp's ranks from __match_any_sync, the warps' from a scan of their counts, the
// tiles' from running totals) instead of a block-wide scan per expert over thread chunks.
extern "C" __global__ void route_layout_few(const uint32_t *choice, const uint32_t *counts,
                                            uint32_t *out, int64_t n, int k, int e,
                                            int64_t capacity, int64_t align, int64_t rows) {
  __shared__ uint32_t off[32], run[32], tot[32];
  __shared__ uint32_t wc[32][33];
  __shared__ int over;
  const int64_t m = n * k;
  RouteOut o = route_prologue(counts, out, n, k, e, capacity, align, rows, off, &over);
  if (threadIdx.x < 32) run[threadIdx.x] = 0;
  __syncthreads();
  if (over) { // capacity, slot-major: s = j * n + t is assignment q = t * k + j
    for (int64_t base = 0; base < m; base += blockDim.x) {
      int64_t s = base + threadIdx.x, q = (s % n) * k + s / n;
      int x = s < m && choice[q] < (uint32_t)e ? (int)choice[q] : -1;
      uint32_t r = tile_rank(x, e, wc, tot);
      if (x >= 0) o.gate[q] = (int64_t)(run[x] + r) < capacity ? x : x + e;
      else if (s < m) o.gate[q] = 2 * e;
      __syncthreads();
      if (threadIdx.x < e) run[threadIdx.x] += tot[threadIdx.x];
    }
    __syncthreads();
    if (threadIdx.x < 32) run[threadIdx.x] = 0;
  } else {
    for (int64_t q = threadIdx.x; q < m; q += blockDim.x)
      o.gate[q] = choice[q] < (uint32_t)e ? choice[q] : 2 * e;
  }
  __syncthreads();
  for (int64_t base = 0; base < m; base += blockDim.x) {
    int64_t q = base + threadIdx.x;
    uint32_t g = q < m ? o.gate[q] : 2 * e;
    int x = g < (uint32_t)e ? (int)g : -1;
    uint32_t r = tile_rank(x, e, wc, tot);
    if (x >= 0) route_place(o, q, off[x] + run[x] + r, n, k, rows);
    else if (q < m) o.combine[(q % k) * n + q / k] = (uint32_t)rows;
    __syncthreads();
    if (threadIdx.x < e) run[threadIdx.x] += tot[threadIdx.x];
  }
}

// An f32 value as a TF32 value plus an f32 remainder, for the split-TF32 matrix products
// (`fused::tf32_split`, the same arithmetic on the host): hi is x rounded to TF32's 10-bit
// mantissa (to nearest, ties away from zero, truncated where rounding would overflow to
// infinity), lo = x - hi, exact in f32. Infinities and NaNs are their own hi, with lo 0.
__device__ __forceinline__ void tf32_split_one(float x, float &hi, float &lo) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    hi = x;
    lo = 0.0f;
    return;
  }
  uint32_t r = (u + 0x1000u) & 0xffffe000u;
  if ((r & 0x7f800000u) == 0x7f800000u) r = u & 0xffffe000u;
  hi = __uint_as_float(r);
  lo = x - hi;
}

__device__ __forceinline__ void tf32_split_v(float x, float &hi, float &lo) {
  tf32_split_one(x, hi, lo);
}

__device__ __forceinline__ void tf32_split_v(float4 x, float4 &hi, float4 &lo) {
  tf32_split_one(x.x, hi.x, lo.x);
  tf32_split_one(x.y, hi.y, lo.y);
  tf32_split_one(x.z, hi.z, lo.z);
  tf32_split_one(x.w, hi.w, lo.w);
}

// One operand of a split product (`cuda::SplitOperand` in fused.rs): x is [outer, inner]
// and out [outer, 3, inner], each run of inner values three times, its parts in the order
// (lo, hi, hi) for the left operand (lo_first) and (hi, lo, hi) for the right one. With a
// run being the operand's extent along the products' inner dimension K, one TF32 product
// over 3K sums lo_a hi_b, then hi_a lo_b, then hi_a hi_b. The threads' x covers a run, their
// y the runs (grid-stride; a block holds several short runs), so no thread divides an
// index; V is float, or float4 where the runs and both addresses allow (inner then counts
// float4s).
template <typename V>
__device__ __forceinline__ void tf32_split3_runs(const V *__restrict__ x, V *__restrict__ out,
                                                 int64_t outer, int64_t inner, int lo_first) {
  int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= inner) return;
  for (int64_t o = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; o < outer;
       o += (int64_t)gridDim.y * blockDim.y) {
    V h, l;
    tf32_split_v(x[o * inner + j], h, l);
    V *dst = out + o * 3 * inner + j;
    dst[0] = lo_first ? l : h;
    dst[inner] = lo_first ? h : l;
    dst[2 * inner] = h;
  }
}

extern "C" __global__ void tf32_split3(const float *x, float *out, int64_t outer, int64_t inner,
                                       int lo_first) {
  tf32_split3_runs(x, out, outer, inner, lo_first);
}

extern "C" __global__ void tf32_split3_x4(const float4 *x, float4 *out, int64_t outer,
                                          int64_t inner4, int lo_first) {
  tf32_split3_runs(x, out, outer, inner4, lo_first);
}
