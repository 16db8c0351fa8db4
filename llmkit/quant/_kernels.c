/* Weight-only int4 / int8 matmuls for x86 CPUs with AVX2 + FMA: y (M, N) fp32 = x (M, K) fp32 @ W^T; and the
 * decode step's attention (llmkit_attn_decode, at the end).
 *
 * Why: torch 2.13's CPU kernels for these weights (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) are
 * vectorised for AVX-512; on an AVX2-only CPU (AMD EPYC, Zen 3) one step's 30 SmolLM2 layers take torch's
 * int4 kernel 11.1 ms at one row (6 GB/s of weights) against 7.9 ms here, its int8 kernel 14.0 ms against 11.0
 * (benchmarks/matmul_bandwidth.py, BENCHMARKS.md "On an AVX2-only CPU").
 *
 * int4 (decode and short prefill chunks, any row count): each row of x is rounded per group of 32 inputs to
 * int16 (dx = max|x| / 32767), the codes times those int16 are summed by madd in int32, and per group g of row n:
 * sum_k w x = s dx sum_k q xq + (z - 8 s) dx sum_k xq, with w = (q - 8) s + z. Each group's codes are unpacked
 * once for up to 8 rows, so a row of a batch gets the same rounding of x as the row alone (its result differs
 * only in the order of the fp32 sums). (llama.cpp rounds x to int8, Q8_1: faster here, but it moved SmolLM2's
 * logits enough to change greedy answers.) The loop this replaced gave 3+ rows fp32 x against weights dequantized
 * in registers (4 FMAs per group and row, x read 4 times); the int16 loop (2 madd + add + convert + FMA, x read
 * twice) is 5-15% faster at 8 rows on the AMD EPYC Zen 3 (interleaved A/B of the two libraries).
 * int8 weights keep fp32 activations: w = q s per row, one FMA per weight; one row in tiles of 4 outputs,
 * from INT8_ROWS_MIN rows on each 8 weights converted once for up to 8 rows. (Rounding the head's one row to int16
 * as above and summing by madd was only a few percent faster on the AMD EPYC: not worth the rounding.)
 * Decode attention (llmkit_attn_decode): one query per row against a KV cache's fp32 slots, for the eager
 * decode step (models/modules.py sdpa): 1.3-2.6x torch's flash SDPA per SmolLM2 layer at 1-8 rows and 128-384
 * slots (benchmarks/matmul_bandwidth.py, AMD EPYC Zen 3), whose share of an 8-row step grows with the slots read.
 *
 * Built by llmkit/quant/native.py with the system C compiler at first use, loaded with ctypes; no torch
 * headers. OpenMP resolves to the libgomp torch has already loaded, so these loops share torch's threads
 * (torch.set_num_threads applies).
 *
 * Layouts (llmkit's portable ones): int4 qweight (N, K/2) uint8, input 2j in the low nibble of byte j and 2j+1
 * in the high one; scales (N, K/32, 2) bf16 (s, z). int8 qweight (N, K) int8, scales (N,) bf16, w = q s.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define GROUP 32

static inline __attribute__((always_inline, target("avx2,fma")))
float hsum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One group of 32 inputs p -> 32 int16 q = round(p * 32767 / max|p|) (to nearest even, as lrintf), the even
 * inputs first, then the odd ones (the order the codes' low and high nibbles unpack in), its step
 * dx = max|p| / 32767 and sx = dx * sum(q). int16 keeps x to 2^-16 of its group's largest value (bf16, which
 * torch's int4 kernel takes, keeps 2^-9 of each value). */
static inline __attribute__((always_inline, target("avx2,fma")))
void quantize_group(const float *p, int16_t *q, float *dx, float *sx) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
    const __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                   _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    /* each 8 inputs to (evens, odds): packs then gives (evens | odds) of 16 inputs per lane */
    const __m256i eo = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i ts = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    ts = _mm_add_epi32(ts, _mm_shuffle_epi32(ts, 0x4E));
    ts = _mm_add_epi32(ts, _mm_shuffle_epi32(ts, 0xB1));
    const __m256i a = _mm256_packs_epi32(_mm256_permutevar8x32_epi32(i0, eo), _mm256_permutevar8x32_epi32(i1, eo));
    const __m256i b = _mm256_packs_epi32(_mm256_permutevar8x32_epi32(i2, eo), _mm256_permutevar8x32_epi32(i3, eo));
    _mm256_storeu_si256((__m256i *)q, _mm256_permute2x128_si256(a, b, 0x20));  /* |q| <= 32767: no saturation */
    _mm256_storeu_si256((__m256i *)(q + 16), _mm256_permute2x128_si256(a, b, 0x31));
    *dx = amax / 32767.0f;
    *sx = *dx * (float)_mm_cvtsi128_si32(ts);
}

/* Row n of W against `mr` (<= ROWS) rows of quantized x. Per group: the 32 codes widened to int16 (low nibbles =
 * even inputs, high = odd) once, then for each row times x's int16 summed in pairs by madd (exact in int32:
 * 2 * 15 * 32767 < 2^31) to 8 int32, converted, and scaled by s * dx into fp32 sums; the offset term
 * (z - 8 s) * dx * sum(xq) is a vector over 8 groups (its own sums for 1-2 rows, the same ones from 3 rows on,
 * which need the registers). The scales of 8 groups are read and multiplied at once (the (N, K/32, 2) layout
 * keeps a row's groups adjacent) and each group's factor is broadcast from that small array. */
#define ROWS 8  /* rows per pass over W: 8 sums + 2 code vectors + temporaries fit AVX2's 16 registers */
static inline __attribute__((always_inline, target("avx2,fma")))
void int4_rows(const int mr, const int16_t *xq, const float *dx, const float *sx, int64_t G, const uint8_t *qw,
               const uint16_t *scales, int64_t n, float *y, int64_t N) {
    const __m256i m0f16 = _mm256_set1_epi16(0x0F);
    const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256 eight = _mm256_set1_ps(8.0f);
    /* FMA latency is 4-5 cycles: with 1-2 rows alternate groups go to a second set of sums so that
     * consecutive groups do not wait on each other; 3 or more rows are enough independent sums */
    const int nacc = mr <= 2 ? 2 : 1;
    __m256 acc[2][ROWS], off[ROWS];  /* off: the offset terms' own sums for 1-2 rows; folded into acc from 3 */
    for (int r = 0; r < mr; r++) acc[0][r] = acc[1][r] = off[r] = _mm256_setzero_ps();
    const uint8_t *wn = qw + n * G * 16;
    const uint16_t *sn = scales + n * G * 2;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        const __m256i sz = _mm256_loadu_si256((const __m256i *)(sn + g * 2));
        const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
        const __m256 m = _mm256_fnmadd_ps(eight, s, _mm256_castsi256_ps(_mm256_and_si256(sz, hi16)));  /* z - 8 s */
        float d[ROWS][8] __attribute__((aligned(32)));  /* s * dx per row and group: broadcast from memory */
        for (int r = 0; r < mr; r++) {
            _mm256_store_ps(d[r], _mm256_mul_ps(s, _mm256_loadu_ps(dx + r * G + g)));
            __m256 *o = nacc == 2 ? &off[r] : &acc[0][r];
            *o = _mm256_fmadd_ps(m, _mm256_loadu_ps(sx + r * G + g), *o);
        }
        for (int gg = 0; gg < 8; gg++) {
            const __m256i wb = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wn + (g + gg) * 16)));
            const __m256i wlo = _mm256_and_si256(wb, m0f16), whi = _mm256_srli_epi16(wb, 4);  /* bytes < 256 */
            for (int r = 0; r < mr; r++) {
                const int16_t *xg = xq + (r * G + g + gg) * GROUP;
                const __m256i p = _mm256_add_epi32(
                    _mm256_madd_epi16(wlo, _mm256_loadu_si256((const __m256i *)xg)),
                    _mm256_madd_epi16(whi, _mm256_loadu_si256((const __m256i *)(xg + 16))));
                __m256 *a = &acc[gg % nacc][r];
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&d[r][gg]), *a);
            }
        }
    }
    float tail[ROWS] = {0};
    for (; g < G; g++) {  /* groups past the last multiple of 8 (K = 576: 2 of 18) */
        const float s = bf16_to_f32(sn[g * 2]), m = bf16_to_f32(sn[g * 2 + 1]) - 8.0f * s;
        const __m256i wb = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wn + g * 16)));
        const __m256i wlo = _mm256_and_si256(wb, m0f16), whi = _mm256_srli_epi16(wb, 4);
        for (int r = 0; r < mr; r++) {
            const int16_t *xg = xq + (r * G + g) * GROUP;
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wlo, _mm256_loadu_si256((const __m256i *)xg)),
                                               _mm256_madd_epi16(whi, _mm256_loadu_si256((const __m256i *)(xg + 16))));
            acc[0][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * dx[r * G + g]), acc[0][r]);
            tail[r] += m * sx[r * G + g];
        }
    }
    for (int r = 0; r < mr; r++)
        y[r * N + n] = nacc == 2 ? hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + hsum(off[r]) + tail[r] : hsum(acc[0][r]) + tail[r];
}

#define INT4_ROWS(MR) \
    static __attribute__((noinline, target("avx2,fma"))) \
    void int4_rows_##MR(const int16_t *xq, const float *dx, const float *sx, int64_t G, const uint8_t *qw, \
                        const uint16_t *scales, int64_t n, float *y, int64_t N) { \
        int4_rows(MR, xq, dx, sx, G, qw, scales, n, y, N); \
    }
/* one instance per row count 1..ROWS (the row loops unrolled, the sums in registers) */
#define FOR_MR(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)
#define INT4_ROWS_FN(MR) int4_rows_##MR,
FOR_MR(INT4_ROWS)
typedef void (*int4_rows_fn)(const int16_t *, const float *, const float *, int64_t, const uint8_t *,
                             const uint16_t *, int64_t, float *, int64_t);
static const int4_rows_fn INT4_ROWS_FNS[ROWS + 1] = {0, FOR_MR(INT4_ROWS_FN)};

/* x (M, K) fp32, qw (N, K/2) uint8 (input 2j in the low nibble of byte j, 2j+1 in the high one), scales
 * (N, K/32, 2) bf16, y (M, N) fp32. K % 32 == 0. x is rounded to int16 (a few microseconds for 8 rows), then
 * each output row of W is read once per 8 rows of x. Returns 0, or -1 if the scratch for x could not be had. */
__attribute__((target("avx2,fma")))
int llmkit_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint16_t *scales, int64_t N,
                   float *y) {
    const int64_t G = K / GROUP;
    void *scratch = malloc((size_t)(2 * M * K + 8 * M * G));  /* int16 x, then its dx and sx */
    if (!scratch) return -1;
    int16_t *xq = (int16_t *)scratch;
    float *dx = (float *)(xq + M * K), *sx = dx + M * G;
    for (int64_t i = 0; i < M * G; i++) quantize_group(x + i * GROUP, xq + i * GROUP, dx + i, sx + i);
    if (M <= 2) {  /* a decode step's one or two rows: called directly, no table or row loop around them */
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (M == 2) int4_rows_2(xq, dx, sx, G, qw, scales, n, y, N);
            else int4_rows_1(xq, dx, sx, G, qw, scales, n, y, N);
        }
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
                const int64_t mr = M - r0 < ROWS ? M - r0 : ROWS;
                INT4_ROWS_FNS[mr](xq + r0 * K, dx + r0 * G, sx + r0 * G, G, qw, scales, n, y + r0 * N, N);
            }
    }
    free(scratch);
    return 0;
}

/* W (N, K) fp32 = (q - 8) s + z from the int4 layout above, one fused multiply-add per weight (as the
 * Python dequantization's addcmul): for a prefill's many rows a GEMM on this copy beats the loop above. */
__attribute__((target("avx2,fma")))
void llmkit_int4_dequant(const uint8_t *qw, const uint16_t *scales, int64_t N, int64_t K, float *w) {
    const int64_t G = K / GROUP;
    const __m128i m0f = _mm_set1_epi8(0x0F);
    const __m256 eight = _mm256_set1_ps(8.0f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(qw + n * G * 16 + g * 16));
            const __m128i lo = _mm_and_si128(v, m0f), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
            const __m128i a = _mm_unpacklo_epi8(lo, hi), b = _mm_unpackhi_epi8(lo, hi);  /* codes in input order */
            const __m256 s = _mm256_set1_ps(bf16_to_f32(scales[(n * G + g) * 2]));
            const __m256 z = _mm256_set1_ps(bf16_to_f32(scales[(n * G + g) * 2 + 1]));
            float *out = w + n * K + g * GROUP;
            const __m128i parts[4] = {a, _mm_srli_si128(a, 8), b, _mm_srli_si128(b, 8)};
            for (int i = 0; i < 4; i++) {
                const __m256 q = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), eight);
                _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(q, s, z));
            }
        }
    }
}

/* One row of x against `nt` (<= 4) rows of W from row n: 4 independent sums hide the FMA latency. */
static inline __attribute__((always_inline, target("avx2,fma")))
void int8_tile(const int nt, const float *x, int64_t K, const int8_t *w, const uint16_t *scales, int64_t n,
               float *y) {
    __m256 acc[4];
    for (int i = 0; i < nt; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 xk = _mm256_loadu_ps(x + k);
        for (int i = 0; i < nt; i++) {
            __m256 wi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + (n + i) * K + k))));
            acc[i] = _mm256_fmadd_ps(wi, xk, acc[i]);
        }
    }
    for (int i = 0; i < nt; i++) y[n + i] = bf16_to_f32(scales[n + i]) * hsum(acc[i]);
}

#define INT8_TILE(NT) \
    static __attribute__((noinline, target("avx2,fma"))) \
    void int8_tile_##NT(const float *x, int64_t K, const int8_t *w, const uint16_t *scales, int64_t n, float *y) { \
        int8_tile(NT, x, K, w, scales, n, y); \
    }
INT8_TILE(4)
INT8_TILE(1)

#define INT8_ROWS_MIN 2  /* below it, one row, the 4-output tiles (int8_tile) */

/* Row n of W against `mr` (<= ROWS) rows of x: each 8 weights converted once, 8 FMAs for 8 rows. */
static inline __attribute__((always_inline, target("avx2,fma")))
void int8_rows(const int mr, const float *x, int64_t K, const int8_t *w, const uint16_t *scales, int64_t n,
               float *y, int64_t N) {
    __m256 acc[ROWS];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
    const int8_t *wn = w + n * K;
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 wk = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wn + k))));
        for (int r = 0; r < mr; r++) acc[r] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + r * K + k), acc[r]);
    }
    const float s = bf16_to_f32(scales[n]);
    for (int r = 0; r < mr; r++) y[r * N + n] = s * hsum(acc[r]);
}

#define INT8_ROWS(MR) \
    static __attribute__((noinline, target("avx2,fma"))) \
    void int8_rows_##MR(const float *x, int64_t K, const int8_t *w, const uint16_t *scales, int64_t n, \
                        float *y, int64_t N) { int8_rows(MR, x, K, w, scales, n, y, N); }
#define INT8_ROWS_FN(MR) int8_rows_##MR,
FOR_MR(INT8_ROWS)
typedef void (*int8_rows_fn)(const float *, int64_t, const int8_t *, const uint16_t *, int64_t, float *, int64_t);
static const int8_rows_fn INT8_ROWS_FNS[ROWS + 1] = {0, FOR_MR(INT8_ROWS_FN)};

/* x (M, K), qw (N, K) int8, scales (N,) bf16, y (M, N); K % 8 == 0. */
__attribute__((target("avx2,fma")))
void llmkit_int8_mm(const float *x, int64_t M, int64_t K, const int8_t *qw, const uint16_t *scales, int64_t N,
                    float *y) {
    if (M >= INT8_ROWS_MIN) {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
                const int64_t mr = M - r0 < ROWS ? M - r0 : ROWS;
                INT8_ROWS_FNS[mr](x + r0 * K, K, qw, scales, n, y + r0 * N, N);
            }
        return;
    }
    const int64_t tiles = (N + 3) / 4;  /* one row */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n = t * 4;
        if (n + 4 <= N) int8_tile_4(x, K, qw, scales, n, y);
        else for (int64_t i = n; i < N; i++) int8_tile_1(x, K, qw, scales, i, y);
    }
}

/* ---------------------------------------------------------------- decode attention */

/* exp(x) for 8 floats: Cephes' expf as in avx_mathfun (range reduction by ln 2, degree-5 polynomial),
 * ~2 ulp, inputs clamped to [-88.38, 88.38] (the caller zeroes masked slots itself: -inf in, 0 out). */
static inline __attribute__((always_inline, target("avx2,fma")))
__m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The sums of 8 vectors, as one vector (s0..s7). */
static inline __attribute__((always_inline, target("avx2,fma")))
__m256 hsum8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* out (D) = sum_j p_j v_j / total over S slots (rows D floats apart), NV vectors of D at a time in registers */
static inline __attribute__((always_inline, target("avx2,fma")))
void weighted_rows(const int NV, const float *p, const float *v, int64_t S, int64_t D, float inv, float *out) {
    for (int64_t d0 = 0; d0 < D; d0 += 8 * NV) {
        __m256 acc[8];
        for (int i = 0; i < NV; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < S; j++) {
            const __m256 pj = _mm256_broadcast_ss(p + j);
            for (int i = 0; i < NV; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * D + d0 + 8 * i), acc[i]);
        }
        for (int i = 0; i < NV; i++) _mm256_storeu_ps(out + d0 + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(inv)));
    }
}

/* One query per row (a decode step) against its row's cached keys and values: q (B, H, D), k and v the
 * cache's (B, KH, S, D) with slots D floats apart and rows/heads kv_sb/kv_sh floats apart, query head h
 * reading K/V head h / (H / KH) (grouped-query attention). mask: NULL (every slot) or (B|1, S) bytes,
 * row stride mask_sb (0: shared by the rows), 0 = not attended. out (B, H, D) = softmax(scale q k^T) v.
 * D % 8 == 0. Scores are kept whole per (row, head) (S floats), then exponentiated against their max: the
 * two-pass softmax, no rescaling. One (row, head) per work item: K and V stream from memory once per query
 * head (the heads sharing a K/V head find it in cache). Returns -1 if a long row's scores could not be had. */
__attribute__((target("avx2,fma")))
int llmkit_attn_decode(const float *q, int64_t B, int64_t H, int64_t KH, int64_t S, int64_t D, const float *k,
                       const float *v, int64_t kv_sb, int64_t kv_sh, const uint8_t *mask, int64_t mask_sb,
                       float scale, float *out) {
    const int64_t rep = H / KH;
    int failed = 0;
#pragma omp parallel
    {
        float stack[2048] __attribute__((aligned(32)));
        float *s = S <= 2048 ? stack : (float *)malloc(sizeof(float) * (size_t)S);
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!s) continue;
            const int64_t b = bh / H, kh = (bh % H) / rep;
            const float *qb = q + bh * D, *kb = k + b * kv_sb + kh * kv_sh, *vb = v + b * kv_sb + kh * kv_sh;
            const uint8_t *mb = mask ? mask + b * mask_sb : NULL;
            const __m256 sc = _mm256_set1_ps(scale);
            __m256 mx = _mm256_set1_ps(-INFINITY);
            int64_t j = 0;
            for (; j + 8 <= S; j += 8) {  /* 8 slots' dot products at once, summed across by hsum8 */
                __m256 a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    const __m256 qd = _mm256_loadu_ps(qb + d);
                    for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(kb + (j + i) * D + d), qd, a[i]);
                }
                __m256 sj = _mm256_mul_ps(hsum8(a), sc);
                if (mb) {  /* bytes 0 -> -inf */
                    const __m256i m8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mb + j)));
                    const __m256 off = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m8, _mm256_setzero_si256()));
                    sj = _mm256_blendv_ps(sj, _mm256_set1_ps(-INFINITY), off);
                }
                _mm256_storeu_ps(s + j, sj);
                mx = _mm256_max_ps(mx, sj);
            }
            float m = -INFINITY;
            for (; j < S; j++) {
                __m256 a = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(kb + j * D + d), _mm256_loadu_ps(qb + d), a);
                s[j] = (mb && !mb[j]) ? -INFINITY : hsum(a) * scale;
                m = fmaxf(m, s[j]);
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            m = fmaxf(m, _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))));
            float *o = out + bh * D;
            if (m == -INFINITY) {  /* no slot attended: zeros (no row of a decode step is empty) */
                memset(o, 0, sizeof(float) * (size_t)D);
                continue;
            }
            const __m256 mv = _mm256_set1_ps(m);
            __m256 tot = _mm256_setzero_ps();
            const __m256 ninf = _mm256_set1_ps(-INFINITY);
            for (j = 0; j + 8 <= S; j += 8) {  /* exp(s - max), exactly 0 where the slot is masked (-inf) */
                const __m256 sj = _mm256_loadu_ps(s + j);
                const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(sj, mv)), _mm256_cmp_ps(sj, ninf, _CMP_NEQ_OQ));
                _mm256_storeu_ps(s + j, e);
                tot = _mm256_add_ps(tot, e);
            }
            float total = hsum(tot);
            for (; j < S; j++) {
                float e[8] __attribute__((aligned(32))) = {s[j] - m};
                _mm256_store_ps(e, exp256(_mm256_load_ps(e)));
                s[j] = s[j] == -INFINITY ? 0.0f : e[0];
                total += s[j];
            }
            if (D % 64 == 0) weighted_rows(8, s, vb, S, D, 1.0f / total, o);
            else if (D % 32 == 0) weighted_rows(4, s, vb, S, D, 1.0f / total, o);
            else weighted_rows(1, s, vb, S, D, 1.0f / total, o);
        }
        if (s != stack) free(s);
    }
    return failed ? -1 : 0;
}
