/* Paged decode attention on CPU: each row's one query token over its context, read in place from
 * the paged KV cache (no gather copy), fp32 math. Built and loaded by paged_decode_cpu.py.
 *
 * Cache: [num_blocks, block_size, num_kv_heads, head_dim], fp32 or bf16, the last three dims
 * contiguous and `block_stride` elements between blocks. q and out: [rows, num_q_heads, head_dim]
 * fp32, contiguous. tables: [rows, table_stride] int32 block ids; lens: [rows] int32 context
 * lengths (the query is the last position of its context); window > 0 keeps the last `window`
 * positions. Per row: one pass over its K positions (every head's scores from each position's
 * contiguous [num_kv_heads, head_dim] values), the softmax, one pass over V. The `omp simd` loops
 * are vectorised under -fopenmp-simd, which needs no OpenMP runtime. Returns 0, or -1 when no
 * scratch memory could be had. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One position's head_dim values as fp32: the cache itself (fp32) or `row` holding them (bf16,
 * the top half of an fp32). */
static inline const float *load_row(const void *cache, int64_t offset, int bf16, float *row, int n) {
    if (!bf16) return (const float *)cache + offset;
    const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
    for (int i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(&row[i], &bits, sizeof(float));
    }
    return row;
}

typedef struct {
    const void *k_cache, *v_cache;
    int64_t block_stride;
    int block_size, num_q_heads, num_kv_heads, head_dim, bf16;
} Cache;

static inline int max_int(int a, int b) { return a > b ? a : b; }
static inline int min_int(int a, int b) { return a < b ? a : b; }

#define INLINE static inline __attribute__((always_inline))

/* scores[hq][i] = q_hq . k_(first + i) for every query head (`qs`: the row's heads, scaled). */
INLINE void row_scores(const Cache *c, const int32_t *table, int first, int len, const float *qs, float *row,
                       float *scores, int dims) {
    int n = len - first, group = c->num_q_heads / c->num_kv_heads;
    int width = c->num_kv_heads * dims;
    for (int b = first / c->block_size; b * c->block_size < len; b++) {
        int64_t block = (int64_t)table[b] * c->block_stride - (int64_t)b * c->block_size * width;
        for (int p = max_int(b * c->block_size, first); p < min_int((b + 1) * c->block_size, len); p++) {
            const float *k = load_row(c->k_cache, block + (int64_t)p * width, c->bf16, row, width);
            for (int hq = 0; hq < c->num_q_heads; hq++) {
                const float *qh = qs + (int64_t)hq * dims, *kh = k + (int64_t)(hq / group) * dims;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < dims; d++) s += qh[d] * kh[d];
                scores[(int64_t)hq * n + (p - first)] = s;
            }
        }
    }
}

/* e^x for x <= 0, vectorisable (libm's expf is not, and was most of the kernel's time): 2^(x log2 e)
 * as 2^n times a degree-6 polynomial of 2^f on f in [-0.5, 0.5]; relative error ~2e-7. Below -87
 * the result is 0 (fp32 underflow), as for expf's denormals, which a softmax sum does not notice. */
static inline float exp_nonpositive(float x) {
    float t = (x < -87.0f ? -87.0f : x) * 1.44269504088896341f;
    float n = __builtin_roundf(t), f = t - n;
    float p = 1.53533059e-4f;
    p = p * f + 1.33989095e-3f;
    p = p * f + 9.61813331e-3f;
    p = p * f + 5.55041070e-2f;
    p = p * f + 2.40226504e-1f;
    p = p * f + 6.93147182e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(float));
    return x < -87.0f ? 0.0f : p * scale;
}

/* Each head's scores become unnormalised probabilities; inv[hq] is 1 / their sum. */
static void softmax_rows(float *scores, int heads, int n, float *inv) {
    for (int hq = 0; hq < heads; hq++) {
        float *sh = scores + (int64_t)hq * n, top = -INFINITY, sum = 0.0f;
        for (int i = 0; i < n; i++) top = sh[i] > top ? sh[i] : top;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < n; i++) {
            sh[i] = exp_nonpositive(sh[i] - top);
            sum += sh[i];
        }
        inv[hq] = 1.0f / sum;
    }
}

/* out_hq = inv[hq] * sum_i p_hq[i] v_(first + i), accumulated in `out` itself. */
INLINE void row_values(const Cache *c, const int32_t *table, int first, int len, const float *scores,
                       const float *inv, float *row, float *out, int dims) {
    int n = len - first, group = c->num_q_heads / c->num_kv_heads;
    int width = c->num_kv_heads * dims;
    memset(out, 0, sizeof(float) * (size_t)c->num_q_heads * dims);
    for (int b = first / c->block_size; b * c->block_size < len; b++) {
        int64_t block = (int64_t)table[b] * c->block_stride - (int64_t)b * c->block_size * width;
        for (int p = max_int(b * c->block_size, first); p < min_int((b + 1) * c->block_size, len); p++) {
            const float *v = load_row(c->v_cache, block + (int64_t)p * width, c->bf16, row, width);
            for (int hq = 0; hq < c->num_q_heads; hq++) {
                float w = scores[(int64_t)hq * n + (p - first)], *oh = out + (int64_t)hq * dims;
                const float *vh = v + (int64_t)(hq / group) * dims;
#pragma omp simd
                for (int d = 0; d < dims; d++) oh[d] += w * vh[d];
            }
        }
    }
    for (int hq = 0; hq < c->num_q_heads; hq++)
        for (int d = 0; d < dims; d++) out[(int64_t)hq * dims + d] *= inv[hq];
}

/* One row, with `dims` a constant where the caller names one (the compiler then unrolls the
 * head_dim loops into whole vectors: 2-3x faster than the generic loop). */
INLINE void attend_row(const Cache *c, const int32_t *table, int first, int len, const float *qs, float *row,
                       float *scores, float *inv, float *out, int dims) {
    row_scores(c, table, first, len, qs, row, scores, dims);
    softmax_rows(scores, c->num_q_heads, len - first, inv);
    row_values(c, table, first, len, scores, inv, row, out, dims);
}

static void attend_row_any(const Cache *c, const int32_t *table, int first, int len, const float *qs, float *row,
                           float *scores, float *inv, float *out) {
    switch (c->head_dim) {
    case 32: attend_row(c, table, first, len, qs, row, scores, inv, out, 32); break;
    case 64: attend_row(c, table, first, len, qs, row, scores, inv, out, 64); break;
    case 128: attend_row(c, table, first, len, qs, row, scores, inv, out, 128); break;
    case 256: attend_row(c, table, first, len, qs, row, scores, inv, out, 256); break;
    default: attend_row(c, table, first, len, qs, row, scores, inv, out, c->head_dim);
    }
}

int paged_decode(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t block_stride,
                 const int32_t *tables, int64_t table_stride, const int32_t *lens, int rows, int num_q_heads,
                 int num_kv_heads, int head_dim, int block_size, float scale, int window, float *out) {
    Cache c = {k_cache, v_cache, block_stride, block_size, num_q_heads, num_kv_heads, head_dim, bf16};
    int max_len = 0;
    for (int r = 0; r < rows; r++) max_len = max_int(max_len, lens[r]);
    size_t row_dims = (size_t)num_q_heads * head_dim;
    float *scores = malloc(sizeof(float) * ((size_t)num_q_heads * (max_len + 1) + row_dims
                                            + (size_t)num_kv_heads * head_dim + num_q_heads));
    if (scores == NULL) return -1;
    float *qs = scores + (size_t)num_q_heads * (max_len + 1), *row = qs + row_dims;
    float *inv = row + (size_t)num_kv_heads * head_dim;
    for (int r = 0; r < rows; r++) {
        int len = lens[r], first = (window > 0 && len > window) ? len - window : 0;
        const int32_t *table = tables + (int64_t)r * table_stride;
        for (size_t i = 0; i < row_dims; i++) qs[i] = q[r * row_dims + i] * scale;
        attend_row_any(&c, table, first, len, qs, row, scores, inv, out + r * row_dims);
    }
    free(scores);
    return 0;
}
