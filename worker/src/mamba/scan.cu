// Mamba's selective scan on the GPU (`worker/src/mamba/cuda.rs` launches these; the CPU
// version in `mod.rs` is the reference they are tested against). Compiled to PTX by build.rs
// when the `cuda` feature is on.
//
// The scan is B * D * N independent linear recurrences h[t] = e[t] h[t-1] + v[t] over L
// steps, with e[t] = exp(delta[t, d] * a[d, n]) and v[t] = delta[t, d] * b[t, n] * u[t, d].
// Walking L steps in one thread leaves the GPU idle for short batches and is latency-bound
// for long ones, so the sequence is cut into chunks of SS_CHUNK steps and scanned in three
// passes, each parallel over chunks:
//   1. every chunk from a zero state: its end state, and the sum of its deltas (the chunk's
//      decay is exp(a * that sum), the product of its steps' e);
//   2. per recurrence, a walk over the chunks (L / SS_CHUNK steps, not L) that turns the end
//      states into each chunk's starting state;
//   3. every chunk again from its true starting state, producing y.
// The backward pass runs the adjoint recurrence q[t-1] = e[t] (q[t] + g[t] c[t]) the same
// way from the end, then each chunk once more with both its forward states (recomputed
// into thread-local memory) and its adjoints, producing every gradient. Gradients summed
// over channels (those of b and c) are reduced across a warp with shuffles and written per
// warp, and those summed over sequences and steps (a's) per chunk; a last pass adds the
// partial sums up in a fixed order, so the result does not depend on scheduling and
// replicas stay bit-identical.
//
// A thread holds one (sequence, chunk, channel) and the states of up to SS_G state indices
// in registers, looping over groups of SS_G when N is larger. Inputs may be f32 or bf16;
// states and sums are f32 either way. Layouts: packed rows p[B*L][2D + 2N] = [u | delta |
// b | c], a[D][N], y and g [B*L][D].

#include <cuda_bf16.h>
#include <stdint.h>

#define SS_CHUNK 64
#define SS_G 16

__device__ __forceinline__ float ss_ld(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ss_ld(const __nv_bfloat16 *p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void ss_st(float *p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void ss_st(__nv_bfloat16 *p, int64_t i, float v) {
  p[i] = __float2bfloat16(v);
}

// Sums each of the SS_G values of v over the 32 lanes of a warp in SS_G shuffles (instead
// of SS_G * 5): each step halves the values a lane keeps and exchanges the other half with
// the lane across. Afterwards lane l holds the total of value ss_index(l) in v[0] (lanes l
// and l ^ 1 hold the same one).
__device__ __forceinline__ void ss_warp_sums(float v[SS_G], int lane) {
#pragma unroll
  for (int half = SS_G / 2, bit = 16; half >= 1; half /= 2, bit /= 2) {
    bool upper = lane & bit;
#pragma unroll
    for (int i = 0; i < half; i++) {
      float send = upper ? v[i] : v[i + half];
      float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
    }
  }
  v[0] += __shfl_xor_sync(0xffffffffu, v[0], 1);
}
__device__ __forceinline__ int ss_index(int lane) {
  return ((lane >> 4) & 1) * 8 + ((lane >> 3) & 1) * 4 + ((lane >> 2) & 1) * 2 + ((lane >> 1) & 1);
}

// Pass 1 of the forward scan (and of the backward's recomputation): each chunk from a zero
// state. hend[b][c][d][n] = its end state, dsum[b][c][d] = the sum of its deltas.
template <typename T>
__device__ void ss_chunk(const T *p, const T *a, float *hend, float *dsum, int L, int D, int N,
                         int C) {
  int d = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y, b = blockIdx.z;
  if (d >= D) return;
  int W = 2 * D + 2 * N, t0 = c * SS_CHUNK, t1 = min(L, t0 + SS_CHUNK);
  int64_t cell = ((int64_t)b * C + c) * D + d;
  float s = 0.f;
  for (int g0 = 0; g0 < N; g0 += SS_G) {
    float h[SS_G], av[SS_G];
#pragma unroll
    for (int j = 0; j < SS_G; j++) {
      h[j] = 0.f;
      av[j] = g0 + j < N ? ss_ld(a, (int64_t)d * N + g0 + j) : 0.f;
    }
    for (int t = t0; t < t1; t++) {
      const T *row = p + ((int64_t)b * L + t) * W;
      float x = ss_ld(row, d), dt = ss_ld(row, D + d), dx = dt * x;
      if (g0 == 0) s += dt;
#pragma unroll
      for (int j = 0; j < SS_G; j++)
        if (g0 + j < N) h[j] = expf(dt * av[j]) * h[j] + dx * ss_ld(row, 2 * D + g0 + j);
    }
#pragma unroll
    for (int j = 0; j < SS_G; j++)
      if (g0 + j < N) hend[cell * N + g0 + j] = h[j];
  }
  dsum[cell] = s;
}

// Pass 2: one thread per (b, d, n) walks the chunks in order and replaces each chunk's end
// state (from a zero start) by its true starting state.
template <typename T>
__device__ void ss_carry(float *h, const float *dsum, const T *a, int B, int D, int N, int C) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)B * D * N) return;
  int64_t dn = i % ((int64_t)D * N);
  int b = (int)(i / ((int64_t)D * N)), d = (int)(dn / N);
  float av = ss_ld(a, dn), carry = 0.f;
  for (int c = 0; c < C; c++) {
    int64_t cell = ((int64_t)b * C + c) * D + d;
    float local = h[cell * N + dn % N];
    h[cell * N + dn % N] = carry;
    carry = expf(av * dsum[cell]) * carry + local;
  }
}

// Pass 3: y of every chunk from its starting state.
template <typename T>
__device__ void ss_out(const T *p, const T *a, const float *start, T *y, int L, int D, int N,
                       int C) {
  int d = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y, b = blockIdx.z;
  if (d >= D) return;
  int W = 2 * D + 2 * N, t0 = c * SS_CHUNK, t1 = min(L, t0 + SS_CHUNK);
  int64_t cell = ((int64_t)b * C + c) * D + d;
  float acc[SS_CHUNK];
  for (int g0 = 0; g0 < N; g0 += SS_G) {
    float h[SS_G], av[SS_G];
#pragma unroll
    for (int j = 0; j < SS_G; j++) {
      h[j] = g0 + j < N ? start[cell * N + g0 + j] : 0.f;
      av[j] = g0 + j < N ? ss_ld(a, (int64_t)d * N + g0 + j) : 0.f;
    }
    for (int t = t0; t < t1; t++) {
      const T *row = p + ((int64_t)b * L + t) * W;
      float x = ss_ld(row, d), dt = ss_ld(row, D + d), dx = dt * x, out = 0.f;
#pragma unroll
      for (int j = 0; j < SS_G; j++)
        if (g0 + j < N) {
          h[j] = expf(dt * av[j]) * h[j] + dx * ss_ld(row, 2 * D + g0 + j);
          out += ss_ld(row, 2 * D + N + g0 + j) * h[j];
        }
      acc[t - t0] = g0 == 0 ? out : acc[t - t0] + out;
    }
  }
  for (int t = t0; t < t1; t++) ss_st(y, ((int64_t)b * L + t) * D + d, acc[t - t0]);
}

// Backward pass 1: each chunk's adjoint from a zero adjoint after its last step; qend holds
// the adjoint reaching the state before the chunk's first step.
template <typename T>
__device__ void ss_chunk_adj(const T *p, const T *a, const T *g, float *qend, int L, int D,
                             int N, int C) {
  int d = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y, b = blockIdx.z;
  if (d >= D) return;
  int W = 2 * D + 2 * N, t0 = c * SS_CHUNK, t1 = min(L, t0 + SS_CHUNK);
  int64_t cell = ((int64_t)b * C + c) * D + d;
  for (int g0 = 0; g0 < N; g0 += SS_G) {
    float q[SS_G], av[SS_G];
#pragma unroll
    for (int j = 0; j < SS_G; j++) {
      q[j] = 0.f;
      av[j] = g0 + j < N ? ss_ld(a, (int64_t)d * N + g0 + j) : 0.f;
    }
    for (int t = t1 - 1; t >= t0; t--) {
      const T *row = p + ((int64_t)b * L + t) * W;
      float dt = ss_ld(row, D + d), gy = ss_ld(g, ((int64_t)b * L + t) * D + d);
#pragma unroll
      for (int j = 0; j < SS_G; j++)
        if (g0 + j < N) q[j] = (q[j] + gy * ss_ld(row, 2 * D + N + g0 + j)) * expf(dt * av[j]);
    }
#pragma unroll
    for (int j = 0; j < SS_G; j++)
      if (g0 + j < N) qend[cell * N + g0 + j] = q[j];
  }
}

// Backward pass 2: one thread per (b, d, n) walks the chunks from the last and replaces
// each chunk's local adjoint by the adjoint arriving after its last step.
template <typename T>
__device__ void ss_carry_adj(float *q, const float *dsum, const T *a, int B, int D, int N,
                             int C) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)B * D * N) return;
  int64_t dn = i % ((int64_t)D * N);
  int b = (int)(i / ((int64_t)D * N)), d = (int)(dn / N);
  float av = ss_ld(a, dn), carry = 0.f;
  for (int c = C - 1; c >= 0; c--) {
    int64_t cell = ((int64_t)b * C + c) * D + d;
    float local = q[cell * N + dn % N];
    q[cell * N + dn % N] = carry;
    carry = expf(av * dsum[cell]) * carry + local;
  }
}

// Backward pass 3: every gradient of a chunk. gp receives du and ddelta (its b and c columns
// are filled by ss_reduce_bc from bc_part[b*L + t][warp][2N]); a_part[b][c][d][n] holds the
// chunk's share of da. All lanes of a warp run the same steps (channels past D contribute
// zeros), as the shuffles need.
template <typename T>
__device__ void ss_grad(const T *p, const T *a, const T *g, const float *start,
                        const float *qin, T *gp, float *bc_part, float *a_part, int L, int D,
                        int N, int C) {
  int d = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y, b = blockIdx.z;
  int lane = threadIdx.x % 32, warps = (D + 31) / 32, warp = d / 32;
  if (warp >= warps) return;  // a whole warp past D (uniform across its lanes)
  bool on = d < D;
  int dd = on ? d : D - 1;
  int W = 2 * D + 2 * N, t0 = c * SS_CHUNK, t1 = min(L, t0 + SS_CHUNK);
  int64_t cell = ((int64_t)b * C + c) * D + dd;
  float gu[SS_CHUNK], gdelta[SS_CHUNK];
  float hs[SS_CHUNK + 1][SS_G];
  for (int g0 = 0; g0 < N; g0 += SS_G) {
    float q[SS_G], av[SS_G], ga[SS_G];
#pragma unroll
    for (int j = 0; j < SS_G; j++) {
      bool live = on && g0 + j < N;
      hs[0][j] = live ? start[cell * N + g0 + j] : 0.f;
      q[j] = live ? qin[cell * N + g0 + j] : 0.f;
      av[j] = live ? ss_ld(a, (int64_t)dd * N + g0 + j) : 0.f;
      ga[j] = 0.f;
    }
    for (int t = t0; t < t1; t++) {
      const T *row = p + ((int64_t)b * L + t) * W;
      float dt = on ? ss_ld(row, D + dd) : 0.f, dx = dt * (on ? ss_ld(row, dd) : 0.f);
      int k = t - t0;
#pragma unroll
      for (int j = 0; j < SS_G; j++)
        hs[k + 1][j] =
            g0 + j < N ? expf(dt * av[j]) * hs[k][j] + dx * ss_ld(row, 2 * D + g0 + j) : 0.f;
    }
    for (int t = t1 - 1; t >= t0; t--) {
      const T *row = p + ((int64_t)b * L + t) * W;
      int k = t - t0;
      float x = on ? ss_ld(row, dd) : 0.f, dt = on ? ss_ld(row, D + dd) : 0.f;
      float gy = on ? ss_ld(g, ((int64_t)b * L + t) * D + dd) : 0.f;
      float gx = 0.f, gdt = 0.f, db[SS_G], dc[SS_G];
#pragma unroll
      for (int j = 0; j < SS_G; j++) {
        db[j] = 0.f;
        dc[j] = 0.f;
        if (g0 + j < N) {
          float bj = ss_ld(row, 2 * D + g0 + j), cj = ss_ld(row, 2 * D + N + g0 + j);
          float gv = q[j] + gy * cj, e = expf(dt * av[j]), prev = hs[k][j];
          dc[j] = gy * hs[k + 1][j];
          gdt += gv * (av[j] * e * prev + bj * x);
          ga[j] += gv * dt * e * prev;
          db[j] = gv * dt * x;
          gx += gv * dt * bj;
          q[j] = gv * e;
        }
      }
      ss_warp_sums(db, lane);
      ss_warp_sums(dc, lane);
      int v = ss_index(lane);
      if (g0 + v < N) {
        float *dst = bc_part + (((int64_t)b * L + t) * warps + warp) * 2 * N;
        if (lane & 1)
          dst[N + g0 + v] = dc[0];
        else
          dst[g0 + v] = db[0];
      }
      gu[k] = g0 == 0 ? gx : gu[k] + gx;
      gdelta[k] = g0 == 0 ? gdt : gdelta[k] + gdt;
    }
    if (on) {
#pragma unroll
      for (int j = 0; j < SS_G; j++)
        if (g0 + j < N) a_part[cell * N + g0 + j] = ga[j];
    }
  }
  if (!on) return;
  for (int t = t0; t < t1; t++) {
    int64_t r = ((int64_t)b * L + t) * W;
    ss_st(gp, r + d, gu[t - t0]);
    ss_st(gp, r + D + d, gdelta[t - t0]);
  }
}

// The b and c columns of gp: the per-warp partial sums of ss_grad added up in warp order.
template <typename T>
__device__ void ss_reduce_bc(const float *bc_part, T *gp, int64_t rows, int D, int N) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * 2 * N) return;
  int64_t r = i / (2 * N);
  int k = (int)(i % (2 * N)), warps = (D + 31) / 32;
  float s = 0.f;
  for (int w = 0; w < warps; w++) s += bc_part[(r * warps + w) * 2 * N + k];
  ss_st(gp, r * (2 * D + 2 * N) + 2 * D + k, s);
}

// da: the per-chunk partial sums of ss_grad added up over sequences and chunks in order.
template <typename T>
__device__ void ss_reduce_a(const float *a_part, T *ga, int64_t cells, int D, int N) {
  int64_t dn = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (dn >= (int64_t)D * N) return;
  float s = 0.f;
  for (int64_t bc = 0; bc < cells; bc++) s += a_part[bc * D * N + dn];
  ss_st(ga, dn, s);
}

#define SS_KERNELS(T, S)                                                                       \
  extern "C" __global__ void ss_chunk_##S(const T *p, const T *a, float *hend, float *dsum,    \
                                          int L, int D, int N, int C) {                        \
    ss_chunk<T>(p, a, hend, dsum, L, D, N, C);                                                 \
  }                                                                                            \
  extern "C" __global__ void ss_carry_##S(float *h, const float *dsum, const T *a, int B,      \
                                          int D, int N, int C) {                               \
    ss_carry<T>(h, dsum, a, B, D, N, C);                                                       \
  }                                                                                            \
  extern "C" __global__ void ss_out_##S(const T *p, const T *a, const float *start, T *y,      \
                                        int L, int D, int N, int C) {                          \
    ss_out<T>(p, a, start, y, L, D, N, C);                                                     \
  }                                                                                            \
  extern "C" __global__ void ss_chunk_adj_##S(const T *p, const T *a, const T *g, float *qend, \
                                              int L, int D, int N, int C) {                    \
    ss_chunk_adj<T>(p, a, g, qend, L, D, N, C);                                                \
  }                                                                                            \
  extern "C" __global__ void ss_carry_adj_##S(float *q, const float *dsum, const T *a, int B,  \
                                              int D, int N, int C) {                           \
    ss_carry_adj<T>(q, dsum, a, B, D, N, C);                                                   \
  }                                                                                            \
  extern "C" __global__ void ss_grad_##S(const T *p, const T *a, const T *g,                   \
                                         const float *start, const float *qin, T *gp,          \
                                         float *bc_part, float *a_part, int L, int D, int N,   \
                                         int C) {                                              \
    ss_grad<T>(p, a, g, start, qin, gp, bc_part, a_part, L, D, N, C);                          \
  }                                                                                            \
  extern "C" __global__ void ss_reduce_bc_##S(const float *bc_part, T *gp, int64_t rows,       \
                                              int D, int N) {                                  \
    ss_reduce_bc<T>(bc_part, gp, rows, D, N);                                                  \
  }                                                                                            \
  extern "C" __global__ void ss_reduce_a_##S(const float *a_part, T *ga, int64_t cells, int D, \
                                             int N) {                                          \
    ss_reduce_a<T>(a_part, ga, cells, D, N);                                                   \
  }

SS_KERNELS(float, f32)
SS_KERNELS(__nv_bfloat16, bf16)
