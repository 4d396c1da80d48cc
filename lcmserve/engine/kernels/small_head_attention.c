/* Softmax attention for small head dimensions on a CPU (D <= 64; it pays below 16): float32 or bfloat16
 * in and out, float32 math.
 *
 * PyTorch's CPU flash attention runs blocked GEMMs whose inner dimension is the head dimension; with
 * D = 4 (8 heads over 32 channels, as in the shapes UNet) those GEMMs do almost no work per call and
 * the kernel runs at a fraction of the rate of the exponentials it must compute. Here each (batch,
 * head) keeps K and V transposed in L1 and every query row is two vectorised passes over the keys:
 * scores and their max, then the exponentials, their sum and the weighted sum of V. The loops are
 * written on whole vector registers (GCC vector extensions), so they vectorise without -ffast-math
 * (NaN and infinity keep their meaning) on AVX-512, AVX2, SSE or NEON. Threads come from the
 * process's OpenMP runtime, the one PyTorch already runs.
 *
 * Layouts: q, k, v are strided [B, H, N, D] views (the last axis contiguous); o is written through its
 * own strides (the caller passes a [B, Nq, H, D] tensor, which is what the output projection wants).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One vector register of floats: 16 with AVX-512, 8 with AVX2, 4 otherwise (SSE, NEON). Wider vectors
 * than the target has would be split into pieces and passed through memory. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define MAX_HEAD_DIM 64

enum { F32 = 0, BF16 = 1 };

static inline float load(const void *p, int64_t i, int dtype) {
  if (dtype == BF16) {
    uint32_t u = ((uint32_t)((const uint16_t *)p)[i]) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float f, int dtype) {
  if (dtype == BF16) { /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40); return; } /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
  } else {
    ((float *)p)[i] = f;
  }
}

/* LANES floats as one value: GCC/Clang vector extensions. */
typedef float vf __attribute__((vector_size(LANES * 4), aligned(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4), aligned(LANES * 4)));

static inline __attribute__((always_inline)) vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return vselect(a > b, a, b); }

/* 2^t for t <= 0 as 2^n * 2^f with n = round(t), |f| <= 1/2, and 2^f by its degree-6 Taylor polynomial:
 * relative error below 2e-7, about a float32 ulp. Rounding adds and subtracts 1.5 * 2^23 (exact in float32
 * without -ffast-math); below -126 the result stays at 2^-126 instead of going to 0, which no sum of
 * weights of at least 1 (the row's maximum) can tell apart. */
static inline __attribute__((always_inline)) vf vexp2_nonpositive(vf t) {
  const float round_magic = 12582912.0f;
  t = vmax(t, (vf){0} - 126.0f);
  vf shifted = t + round_magic;
  vf n = shifted - round_magic;
  vf f = t - n;
  vf p = f * 1.5403530393381606e-4f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  vi exponent = ((vi)shifted - (vi)((vf){0} + round_magic) + 127) << 23;
  return p * (vf)exponent;
}

/* Lane reductions as trees of vector halves down to 4 lanes (on 16 lanes, a chain of dependent scalar
 * adds per row would cost as much as the row's arithmetic for short key counts). */
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
#if LANES >= 8
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
#endif

static inline __attribute__((always_inline)) vf4 quarter(vf a, int is_max) {
#if LANES == 16
  union { vf v; vf8 h[2]; } u16 = {a};
  vi8 m8 = u16.h[0] > u16.h[1];
  vf8 a8 = is_max ? (vf8)((m8 & (vi8)u16.h[0]) | (~m8 & (vi8)u16.h[1])) : u16.h[0] + u16.h[1];
#elif LANES == 8
  vf8 a8 = a;
#endif
#if LANES >= 8
  union { vf8 v; vf4 h[2]; } u8 = {a8};
  vi4 m4 = u8.h[0] > u8.h[1];
  return is_max ? (vf4)((m4 & (vi4)u8.h[0]) | (~m4 & (vi4)u8.h[1])) : u8.h[0] + u8.h[1];
#else
  (void)is_max;
  return a;
#endif
}

static inline __attribute__((always_inline)) float vsum(vf a) {
  vf4 q = quarter(a, 0);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

static inline __attribute__((always_inline)) float vmaxall(vf a) {
  vf4 q = quarter(a, 1);
  float x = q[0] > q[2] ? q[0] : q[2], y = q[1] > q[3] ? q[1] : q[3];
  return x > y ? x : y;
}

/* Query rows i .. i+R-1 of one (batch, head) against all keys. R rows at once share every load of K
 * and V and give the core R independent chains; R and d are constants after inlining, so the loops
 * over rows and channels unroll and the accumulators live in registers. s: [R][nb] scratch. */
static inline __attribute__((always_inline)) void query_rows(
    const void *q, void *o, int64_t b, int64_t h, int64_t i, const int R, int64_t nb, const int64_t d,
    const int64_t *qs, const int64_t *os, float to_exp2, int dtype, const vf *kt, const vf *vt, vf pad, vf *s) {
  float qr[2][MAX_HEAD_DIM];
  for (int r = 0; r < R; r++)
    for (int64_t c = 0; c < d; c++) qr[r][c] = load(q, b * qs[0] + h * qs[1] + (i + r) * qs[2] + c, dtype);
  /* 1. unscaled scores and their max (the scale is applied once, to s - max: scaling the keys first
   *    would round every product and cost an order of magnitude of accuracy on large scores) */
  vi below_inf[2]; /* false for NaN and +inf; -inf is a key with weight 0 */
  vf m[2];
  for (int r = 0; r < R; r++) {
    below_inf[r] = (vi){0} - 1;
    m[r] = (vf){0} - INFINITY;
  }
  for (int64_t j = 0; j < nb; j++) {
    vf sj[2] = {(vf){0}, (vf){0}};
    for (int64_t c = 0; c < d; c++) {
      const vf kc = kt[c * nb + j];
      for (int r = 0; r < R; r++) sj[r] += qr[r][c] * kc;
    }
    for (int r = 0; r < R; r++) {
      below_inf[r] &= sj[r] <= 3.4028235e38f;
      if (j == nb - 1) sj[r] += pad;
      s[r * nb + j] = sj[r];
      m[r] = vmax(m[r], sj[r]);
    }
  }
  float row_max[2];
  int defined[2];
  for (int r = 0; r < R; r++) {
    row_max[r] = vmaxall(m[r]);
    defined[r] = row_max[r] > -INFINITY; /* all keys -inf: 0/0 */
    for (int l = 0; l < LANES; l++) defined[r] &= below_inf[r][l] != 0;
  }
  /* 2. exp, their sum and the weighted sum of values in one pass */
  vf sum[2], acc[2][MAX_HEAD_DIM];
  for (int r = 0; r < R; r++) {
    sum[r] = (vf){0};
    for (int64_t c = 0; c < d; c++) acc[r][c] = (vf){0};
  }
  for (int64_t j = 0; j < nb; j++) {
    vf e[2];
    for (int r = 0; r < R; r++) {
      e[r] = vexp2_nonpositive((s[r * nb + j] - row_max[r]) * to_exp2);
      sum[r] += e[r];
    }
    for (int64_t c = 0; c < d; c++) {
      const vf vc = vt[c * nb + j];
      for (int r = 0; r < R; r++) acc[r][c] += e[r] * vc;
    }
  }
  /* 3. normalise; a NaN or +inf score makes the row NaN, as the math does */
  for (int r = 0; r < R; r++) {
    const float inv = defined[r] ? 1.0f / vsum(sum[r]) : NAN;
    for (int64_t c = 0; c < d; c++)
      store(o, b * os[0] + h * os[1] + (i + r) * os[2] + c, vsum(acc[r][c]) * inv, dtype);
  }
}

/* One (batch, head): K and V transposed into kt/vt ([D][nb], nb = keys / LANES), then the query rows,
 * two at a time for heads of up to 8 channels (beyond, two rows' accumulators outgrow the registers). */
static inline __attribute__((always_inline)) void one_head(
    const void *q, const void *k, const void *v, void *o, int64_t b, int64_t h, int64_t nq, int64_t nk,
    const int64_t d, const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *os, float scale,
    int dtype, vf *kt, vf *vt, vf *s) {
  const int64_t nb = (nk + LANES - 1) / LANES;
  float *ktf = (float *)kt, *vtf = (float *)vt;
  for (int64_t c = 0; c < d; c++) /* padding keys: zero, so they add nothing to scores or values */
    for (int64_t j = nk; j < nb * LANES; j++) ktf[c * nb * LANES + j] = vtf[c * nb * LANES + j] = 0.0f;
  for (int64_t j = 0; j < nk; j++) {
    for (int64_t c = 0; c < d; c++) {
      ktf[c * nb * LANES + j] = load(k, b * ks[0] + h * ks[1] + j * ks[2] + c, dtype);
      vtf[c * nb * LANES + j] = load(v, b * vs[0] + h * vs[1] + j * vs[2] + c, dtype);
    }
  }
  vf pad = (vf){0}; /* -inf on the padding keys of the last block: weight 0, and never the row's max */
  for (int64_t j = nk; j < nb * LANES; j++) pad[j % LANES] = -INFINITY;
  const float to_exp2 = scale * 1.44269504088896341f;
  int64_t i = 0;
  if (d <= 8)
    for (; i + 2 <= nq; i += 2) query_rows(q, o, b, h, i, 2, nb, d, qs, os, to_exp2, dtype, kt, vt, pad, s);
  for (; i < nq; i++) query_rows(q, o, b, h, i, 1, nb, d, qs, os, to_exp2, dtype, kt, vt, pad, s);
}

#define HEAD_CASE(D)                                                                                      \
  case D:                                                                                                 \
    one_head(q, k, v, o, b, h, nq, nk, D, qs, ks, vs, os, scale, dtype, kt, vt, s);                       \
    break;

static void one_head_any(const void *q, const void *k, const void *v, void *o, int64_t b, int64_t h, int64_t nq,
                         int64_t nk, int64_t d, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                         const int64_t *os, float scale, int dtype, vf *kt, vf *vt, vf *s) {
  switch (d) {
    HEAD_CASE(1) HEAD_CASE(2) HEAD_CASE(4) HEAD_CASE(8) HEAD_CASE(12) HEAD_CASE(16)
    default:
      one_head(q, k, v, o, b, h, nq, nk, d, qs, ks, vs, os, scale, dtype, kt, vt, s);
  }
}

int lcm_small_head_attention_max_head_dim(void) { return MAX_HEAD_DIM; }

/* Returns 0 on success, 1 for a head dimension above MAX_HEAD_DIM, 2 when scratch memory ran out. */
int lcm_small_head_attention(const void *q, const void *k, const void *v, void *o, int64_t batch, int64_t heads,
                             int64_t nq, int64_t nk, int64_t d, const int64_t *qs, const int64_t *ks,
                             const int64_t *vs, const int64_t *os, float scale, int dtype) {
  if (d < 1 || d > MAX_HEAD_DIM) return 1;
  const int64_t nb = (nk + LANES - 1) / LANES;
  int failed = 0;
#pragma omp parallel
  {
    vf *scratch = aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)((2 * d + 2) * nb));
    if (scratch == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < batch * heads; bh++)
        one_head_any(q, k, v, o, bh / heads, bh % heads, nq, nk, d, qs, ks, vs, os, scale, dtype, scratch,
                 scratch + d * nb, scratch + 2 * d * nb);
    }
    free(scratch);
  }
  return failed ? 2 : 0;
}
