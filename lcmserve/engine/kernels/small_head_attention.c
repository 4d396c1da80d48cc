/* Softmax attention for small head dimensions on a CPU (D <= 64; it pays below 16): float32 or bfloat16
 * in and out, float32 math.
 *
 * PyTorch's CPU flash attention runs blocked GEMMs whose inner dimension is the head dimension; with
 * D = 4 (8 heads over 32 channels, as in the shapes UNet) those GEMMs do almost no work per call and
 * the kernel runs at a fraction of the rate of the exponentials it must compute. Here the vector lanes
 * hold query rows, not keys: per (batch, head), K and V are converted to float32 once, and each block of
 * LANES query rows makes two passes over the keys, every key's values broadcast to all lanes: the scores
 * and their running max, then the exponentials, their sum and the weighted sum of V. Max, sum and
 * output stay per lane, so no step reduces across lanes, which makes a key as cheap in cross-attention
 * over a few text tokens as in self-attention. The loops are written on whole vector registers (GCC
 * vector extensions), so they vectorise without -ffast-math (NaN and infinity keep their meaning) on
 * AVX-512, AVX2, SSE or NEON. Threads come from the process's OpenMP runtime, the one PyTorch runs.
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
#define KEY_BLOCK 16

#if defined(__SSE__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

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

/* LANES floats as one value: GCC/Clang vector extensions. */
typedef float vf __attribute__((vector_size(LANES * 4), aligned(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4), aligned(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4), aligned(LANES * 4)));

/* a > b ? a : b per lane, so a NaN in either gives b. One instruction where the target has it (GCC
 * does not turn the select into one without -ffast-math); NEON's returns NaN for a NaN in either, which
 * serves the two uses below as well. */
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) {
#if LANES == 16
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif LANES == 8
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__)
  return (vf)_mm_max_ps((__m128)a, (__m128)b);
#elif defined(__ARM_NEON)
  return (vf)vmaxq_f32((float32x4_t)a, (float32x4_t)b);
#else
  vi mask = a > b;
  return (vf)((mask & (vi)a) | (~mask & (vi)b));
#endif
}

/* 2^t for t <= 0 as 2^n * 2^f with n = round(t), |f| <= 1/2, and 2^f by its degree-6 Taylor polynomial:
 * relative error below 2e-7, about a float32 ulp. Rounding adds and subtracts 1.5 * 2^23 (exact in float32
 * without -ffast-math); below -126 the result stays at 2^-126 instead of going to 0, which no sum of
 * weights of at least 1 (the row's maximum) can tell apart. A NaN t gives NaN. */
static inline __attribute__((always_inline)) vf vexp2_nonpositive(vf t) {
  const float round_magic = 12582912.0f;
  t = vmax((vf){0} - 126.0f, t); /* NaN is the second operand: it stays NaN */
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

/* float32 -> bfloat16 bits per lane, rounding to nearest even as torch does; NaN stays a quiet NaN. */
static inline __attribute__((always_inline)) vu bf16_bits(vf x) {
  vu u = (vu)x;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vi nan = (vi)((u & 0x7fffffffu) > 0x7f800000u);
  return (vu)((nan & (vi)((u >> 16) | 0x40u)) | (~nan & (vi)rounded));
}

/* Query rows i .. i+rows-1 (rows <= LANES) of one (batch, head), one per lane, against all keys. kf, vf_:
 * the head's keys and values as float32 [nk][d]; s: [nk] vectors of scratch. d is a constant after
 * inlining, so the loops over channels unroll and the accumulators live in registers. */
static inline __attribute__((always_inline)) void query_block(
    const void *q, void *o, int64_t b, int64_t h, int64_t i, int64_t rows, int64_t nk, const int64_t d,
    const int64_t *qs, const int64_t *os, float to_exp2, int dtype, const float *kf, const float *vf_, vf *s) {
  vf qv[MAX_HEAD_DIM];
  for (int64_t c = 0; c < d; c++) qv[c] = (vf){0}; /* missing rows: zero queries, never stored */
  for (int64_t l = 0; l < rows; l++)
    for (int64_t c = 0; c < d; c++) qv[c][l] = load(q, b * qs[0] + h * qs[1] + (i + l) * qs[2] + c, dtype);
  /* 1. unscaled scores and their max (the scale is applied once, to s - max: scaling the keys first
   *    would round every product and cost an order of magnitude of accuracy on large scores) */
  vf m = (vf){0} - INFINITY;
  for (int64_t j = 0; j < nk; j++) {
    const float *kj = kf + j * d;
    vf sj = (vf){0}; /* from zero, every product is fused into the running sum (one rounding each) */
    for (int64_t c = 0; c < d; c++) sj += qv[c] * kj[c];
    s[j] = sj;
    m = vmax(m, sj);
  }
  /* 2. exp, their sum and the weighted sum of values in one pass. A NaN score, a +inf one (inf - inf)
   *    and a row whose keys are all -inf (-inf + inf) reach the exp as NaN and make the row NaN, as the
   *    math does; a -inf score among finite ones gets the exp's floor, 2^-126 against the max's 1. */
  /*    Sums run over blocks of KEY_BLOCK keys, then over the blocks: a float32 rounding error that
   *    grows with the block count and block size, not the key count (a single running sum over 256 keys
   *    doubles it). */
  vf sum = (vf){0}, acc[MAX_HEAD_DIM];
  for (int64_t c = 0; c < d; c++) acc[c] = (vf){0};
  for (int64_t j0 = 0; j0 < nk; j0 += KEY_BLOCK) {
    const int64_t j1 = nk - j0 < KEY_BLOCK ? nk : j0 + KEY_BLOCK;
    vf block_sum = (vf){0}, block[MAX_HEAD_DIM];
    for (int64_t c = 0; c < d; c++) block[c] = (vf){0};
    for (int64_t j = j0; j < j1; j++) {
      const vf e = vexp2_nonpositive((s[j] - m) * to_exp2);
      const float *vj = vf_ + j * d;
      block_sum += e;
      for (int64_t c = 0; c < d; c++) block[c] += e * vj[c];
    }
    sum += block_sum;
    for (int64_t c = 0; c < d; c++) acc[c] += block[c];
  }
  /* 3. normalise and store each lane's row */
  const vf inv = 1.0f / sum;
  for (int64_t c = 0; c < d; c++) {
    const vf out = acc[c] * inv;
    const int64_t at = b * os[0] + h * os[1] + i * os[2] + c;
    if (dtype == BF16) {
      const vu bits = bf16_bits(out);
      for (int64_t l = 0; l < rows; l++) ((uint16_t *)o)[at + l * os[2]] = (uint16_t)bits[l];
    } else {
      for (int64_t l = 0; l < rows; l++) ((float *)o)[at + l * os[2]] = out[l];
    }
  }
}

/* One (batch, head): K and V into float32 scratch, then the query rows, LANES at a time. */
static inline __attribute__((always_inline)) void one_head(
    const void *q, const void *k, const void *v, void *o, int64_t b, int64_t h, int64_t nq, int64_t nk,
    const int64_t d, const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *os, float scale,
    int dtype, float *kf, float *vf_, vf *s) {
  for (int64_t j = 0; j < nk; j++)
    for (int64_t c = 0; c < d; c++) {
      kf[j * d + c] = load(k, b * ks[0] + h * ks[1] + j * ks[2] + c, dtype);
      vf_[j * d + c] = load(v, b * vs[0] + h * vs[1] + j * vs[2] + c, dtype);
    }
  const float to_exp2 = scale * 1.44269504088896341f;
  for (int64_t i = 0; i < nq; i += LANES)
    query_block(q, o, b, h, i, nq - i < LANES ? nq - i : LANES, nk, d, qs, os, to_exp2, dtype, kf, vf_, s);
}

#define HEAD_CASE(D)                                                                                      \
  case D:                                                                                                 \
    one_head(q, k, v, o, b, h, nq, nk, D, qs, ks, vs, os, scale, dtype, kf, vf_, s);                      \
    break;

static void one_head_any(const void *q, const void *k, const void *v, void *o, int64_t b, int64_t h, int64_t nq,
                         int64_t nk, int64_t d, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                         const int64_t *os, float scale, int dtype, float *kf, float *vf_, vf *s) {
  switch (d) {
    HEAD_CASE(1) HEAD_CASE(2) HEAD_CASE(4) HEAD_CASE(8) HEAD_CASE(12) HEAD_CASE(16) HEAD_CASE(24)
    default:
      one_head(q, k, v, o, b, h, nq, nk, d, qs, ks, vs, os, scale, dtype, kf, vf_, s);
  }
}

int lcm_small_head_attention_max_head_dim(void) { return MAX_HEAD_DIM; }

/* Returns 0 on success, 1 for a head dimension above MAX_HEAD_DIM, 2 when scratch memory ran out. */
int lcm_small_head_attention(const void *q, const void *k, const void *v, void *o, int64_t batch, int64_t heads,
                             int64_t nq, int64_t nk, int64_t d, const int64_t *qs, const int64_t *ks,
                             const int64_t *vs, const int64_t *os, float scale, int dtype) {
  if (d < 1 || d > MAX_HEAD_DIM) return 1;
  /* per thread: the scores [nk] vectors, then K and V as float32 [nk][d] each */
  const size_t kv_vectors = (size_t)((2 * nk * d + LANES - 1) / LANES);
  int failed = 0;
#pragma omp parallel
  {
    vf *scratch = aligned_alloc(sizeof(vf), sizeof(vf) * ((size_t)nk + kv_vectors));
    if (scratch == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
      float *kf = (float *)(scratch + nk);
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < batch * heads; bh++)
        one_head_any(q, k, v, o, bh / heads, bh % heads, nq, nk, d, qs, ks, vs, os, scale, dtype, kf,
                     kf + nk * d, scratch);
    }
    free(scratch);
  }
  return failed ? 2 : 0;
}
