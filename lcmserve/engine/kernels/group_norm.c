/* Group-norm statistics of a channels-last (NHWC) image batch on a CPU: float32 or bfloat16 in, float32
 * mean and 1/std per (image, group) out.
 *
 * Why: with frozen weights, torch.compile lays convolution outputs out channels-last for oneDNN, and
 * inductor's group norm then reduces each group's few channels (2 in a VAE with 32 channels in 16
 * groups) as a masked vector per pixel: 8 ms for a [32, 32, 64, 64] bfloat16 batch that holds 8 MB.
 * Here the vector runs along the channels instead: one pass per image sums every channel at once, the
 * groups are formed from the channel sums, and the normalisation itself stays with inductor, which
 * fuses it with the SiLU that follows as a plain element-wise loop.
 *
 * Numerics: the sums are of x - shift[c] (shift: the channel's first pixel, so the squares do not
 * cancel when the mean is far from zero) in float32 over blocks of PIXEL_BLOCK pixels, then in double
 * over the blocks; the group's variance is formed from the shifted sums in double. No -ffast-math.
 *
 * Layout: x is [N][P][C] with C contiguous (stride 1), pixel stride xs[2] and image stride xs[0].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };
#define PIXEL_BLOCK 64
#define REGISTER_WIDTH 64 /* widths up to this keep their block sums in registers */

static inline float load(const void *p, int64_t i, int dtype) {
  if (dtype == BF16) {
    uint32_t u = ((uint32_t)((const uint16_t *)p)[i]) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return ((const float *)p)[i];
}

/* Per channel of one image: s1 = sum of (x - shift), s2 = sum of (x - shift)^2. c is a constant after
 * inlining for the common widths, so the loop over channels is whole vector registers. */
static inline __attribute__((always_inline)) void image_sums(
    const void *x, int64_t base, const int64_t c, int64_t p, int64_t sp, const int dtype, float *restrict shift,
    double *restrict s1, double *restrict s2, float *restrict spill1, float *restrict spill2) {
  float r1[c <= REGISTER_WIDTH ? c : 1], r2[c <= REGISTER_WIDTH ? c : 1];
  float *restrict b1 = c <= REGISTER_WIDTH ? r1 : spill1, *restrict b2 = c <= REGISTER_WIDTH ? r2 : spill2;
  for (int64_t k = 0; k < c; k++) {
    shift[k] = load(x, base + k, dtype);
    s1[k] = s2[k] = 0.0;
  }
  for (int64_t p0 = 0; p0 < p; p0 += PIXEL_BLOCK) {
    const int64_t p1 = p - p0 < PIXEL_BLOCK ? p : p0 + PIXEL_BLOCK;
    for (int64_t k = 0; k < c; k++) b1[k] = b2[k] = 0.0f;
    for (int64_t i = p0; i < p1; i++) {
      const int64_t at = base + i * sp;
      for (int64_t k = 0; k < c; k++) {
        const float v = load(x, at + k, dtype) - shift[k];
        b1[k] += v;
        b2[k] += v * v;
      }
    }
    for (int64_t k = 0; k < c; k++) {
      s1[k] += b1[k];
      s2[k] += b2[k];
    }
  }
}

#define SUMS(C, D) image_sums(x, base, C, p, sp, D, shift, s1, s2, spill1, spill2)
#define WIDTHS(D)                                                                                         \
  switch (c) {                                                                                            \
    case 16: SUMS(16, D); break;                                                                          \
    case 32: SUMS(32, D); break;                                                                          \
    case 64: SUMS(64, D); break;                                                                          \
    case 96: SUMS(96, D); break;                                                                          \
    case 128: SUMS(128, D); break;                                                                        \
    case 256: SUMS(256, D); break;                                                                        \
    case 320: SUMS(320, D); break;                                                                        \
    case 512: SUMS(512, D); break;                                                                        \
    default: SUMS(c, D);                                                                                  \
  }

static void one_image(const void *x, int64_t base, int64_t c, int64_t p, int64_t sp, int dtype, float *shift,
                      double *s1, double *s2, float *spill1, float *spill2) {
  if (dtype == BF16) {
    WIDTHS(BF16)
  } else {
    WIDTHS(F32)
  }
}

/* Returns 0 on success, 1 for a layout or group count it does not take, 2 when scratch memory ran out. */
int lcm_group_norm_stats(const void *x, float *mean, float *rstd, int64_t n, int64_t c, int64_t p, int64_t groups,
                         const int64_t *xs, float eps, int dtype) {
  if (groups < 1 || c % groups != 0 || xs[1] != 1) return 1;
  const int64_t per = c / groups;
  int failed = 0;
#pragma omp parallel
  {
    void *scratch = malloc((sizeof(double) * 2 + sizeof(float) * 3) * (size_t)c);
    if (scratch == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
      double *s1 = scratch, *s2 = s1 + c;
      float *shift = (float *)(s2 + c), *spill1 = shift + c, *spill2 = spill1 + c;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; i++) {
        one_image(x, i * xs[0], c, p, xs[2], dtype, shift, s1, s2, spill1, spill2);
        for (int64_t g = 0; g < groups; g++) {
          /* the group's mean m, then sum (x - m)^2 = s2 - 2 (m - shift) s1 + p (m - shift)^2 per channel */
          double total = 0.0, squares = 0.0;
          for (int64_t k = g * per; k < (g + 1) * per; k++) total += s1[k] + (double)shift[k] * (double)p;
          const double m = total / (double)(per * p);
          for (int64_t k = g * per; k < (g + 1) * per; k++) {
            const double d = m - shift[k];
            squares += s2[k] - 2.0 * d * s1[k] + (double)p * d * d;
          }
          const double var = squares > 0.0 ? squares / (double)(per * p) : 0.0;
          mean[i * groups + g] = (float)m;
          rstd[i * groups + g] = (float)(1.0 / sqrt(var + (double)eps));
        }
      }
    }
    free(scratch);
  }
  return failed ? 2 : 0;
}
