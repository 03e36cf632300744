/* Paged attention on CPU, fp32 math: decode rows (each row's one query token over its context, read
 * in place from the paged KV cache, no gather copy) and, at the end of the file, one request's
 * prefill chunk. Built and loaded by paged_decode_cpu.py.
 *
 * Cache: [num_blocks, block_size, num_kv_heads, head_dim], fp32 or bf16, the last three dims
 * contiguous and `block_stride` elements between blocks. q and out: [rows, num_q_heads, head_dim]
 * fp32, contiguous. tables: [rows, table_stride] int32 block ids; lens: [rows] int32 context
 * lengths (the query is the last position of its context); window > 0 keeps the last `window`
 * positions. Per row: one pass over its K positions (every head's scores from each position's
 * contiguous [num_kv_heads, head_dim] values), the softmax, one pass over V. Returns 0, -1 when
 * no scratch memory could be had, -2 for a head_dim beyond the vector registers (MAX_CHUNKS).
 *
 * The head_dim loops are written with the compiler's vector types (GCC and clang), LANES floats
 * wide for the instruction set -march=native gives, with a scalar tail where head_dim is not a
 * multiple of LANES. Left to the auto-vectoriser, a dot product's final sum was a chain of 16
 * dependent scalar adds, and fp32 caches took a scalar loop: 2-6x slower (docs/benchmarks.md 23). */

#include <stdlib.h>

#include "native_cpu.h"

#if defined(LANES)
/* set by the build (the tests build every width) */
#elif defined(__AVX__)
#define LANES 8 /* also with AVX-512: on this project's Zen 4 hosts 16 lanes were 0-20 % slower (the sums) */
#else
#define LANES 4
#endif
#define MAX_CHUNKS (256 / LANES) /* the vector registers of one position's head (head_dim <= 256 vectorised) */

typedef float vec __attribute__((vector_size(4 * LANES)));
typedef int32_t lane_ids __attribute__((vector_size(4 * LANES)));
typedef uint16_t bf16_vec __attribute__((vector_size(2 * LANES)));
typedef uint32_t bits_vec __attribute__((vector_size(4 * LANES)));

#if defined(__clang__)
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (lane_ids){__VA_ARGS__})
#endif

typedef struct {
    const void *k_cache, *v_cache;
    int64_t block_stride;
    int block_size, num_q_heads, num_kv_heads, head_dim, bf16;
} Cache;

static inline int max_int(int a, int b) { return a > b ? a : b; }
static inline int min_int(int a, int b) { return a < b ? a : b; }


/* LANES values from `at` as fp32: loaded (fp32) or widened (bf16 is the top half of an fp32). */
INLINE vec load_vec(const void *cache, int bf16, int64_t at) {
    vec v;
    if (bf16) {
        bf16_vec half;
        memcpy(&half, (const uint16_t *)cache + at, sizeof half);
        bits_vec bits = __builtin_convertvector(half, bits_vec) << 16;
        memcpy(&v, &bits, sizeof v);
    } else {
        memcpy(&v, (const float *)cache + at, sizeof v);
    }
    return v;
}


/* The sum of a vector's lanes: a tree of log2(LANES) shuffles and adds. */
INLINE float hsum(vec v) {
#if LANES == 16
    v += SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#elif LANES == 8
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
#else
    v += SHUFFLE(v, 2, 3, 0, 1);
    v += SHUFFLE(v, 1, 0, 3, 2);
#endif
    return v[0];
}

/* q_h . k over `dims` values (the k position's head starting at `at`). */
INLINE float dot(const float *q, const vec *k, const void *cache, int bf16, int64_t at, int dims) {
    int chunks = dims / LANES;
    vec acc = {0};
    for (int x = 0; x < chunks; x++) {
        vec qx;
        memcpy(&qx, q + x * LANES, sizeof qx);
        acc += qx * k[x];
    }
    float s = hsum(acc);
    for (int d = chunks * LANES; d < dims; d++) s += q[d] * load_one(cache, bf16, at + d);
    return s;
}

/* out += w * v over `dims` values. */
INLINE void axpy(float *out, float w, const vec *v, const void *cache, int bf16, int64_t at, int dims) {
    int chunks = dims / LANES;
    for (int x = 0; x < chunks; x++) {
        vec o;
        memcpy(&o, out + x * LANES, sizeof o);
        o += w * v[x];
        memcpy(out + x * LANES, &o, sizeof o);
    }
    for (int d = chunks * LANES; d < dims; d++) out[d] += w * load_one(cache, bf16, at + d);
}

/* scores[hq][i] = q_hq . k_(first + i) for every query head (`qs`: the row's heads, scaled); each
 * kv head's values are loaded once for its group of query heads. */
INLINE void row_scores(const Cache *c, const int32_t *table, int first, int len, const float *qs, float *scores,
                       int dims) {
    int n = len - first, group = c->num_q_heads / c->num_kv_heads, width = c->num_kv_heads * dims;
    for (int b = first / c->block_size; b * c->block_size < len; b++) {
        int64_t block = (int64_t)table[b] * c->block_stride - (int64_t)b * c->block_size * width;
        for (int p = max_int(b * c->block_size, first); p < min_int((b + 1) * c->block_size, len); p++) {
            for (int g = 0, hq = 0; g < c->num_kv_heads; g++) {
                int64_t at = block + (int64_t)p * width + (int64_t)g * dims;
                vec k[MAX_CHUNKS];
                for (int x = 0; x < dims / LANES; x++) k[x] = load_vec(c->k_cache, c->bf16, at + x * LANES);
                for (int j = 0; j < group; j++, hq++)
                    scores[(int64_t)hq * n + (p - first)] = dot(qs + (int64_t)hq * dims, k, c->k_cache, c->bf16, at, dims);
            }
        }
    }
}


/* Each head's scores become unnormalised probabilities; inv[hq] is 1 / their sum. */
static void softmax_rows(float *scores, int heads, int n, float *inv) {
    for (int hq = 0; hq < heads; hq++) {
        float *sh = scores + (int64_t)hq * n, top = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : top)
        for (int i = 0; i < n; i++) top = sh[i] > top ? sh[i] : top;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < n; i++) {
            sh[i] = exp_fast(sh[i] - top);
            sum += sh[i];
        }
        inv[hq] = 1.0f / sum;
    }
}

/* out_hq = inv[hq] * sum_i p_hq[i] v_(first + i), accumulated in `out` itself. */
INLINE void row_values(const Cache *c, const int32_t *table, int first, int len, const float *scores,
                       const float *inv, float *out, int dims) {
    int n = len - first, group = c->num_q_heads / c->num_kv_heads, width = c->num_kv_heads * dims;
    memset(out, 0, sizeof(float) * (size_t)c->num_q_heads * dims);
    for (int b = first / c->block_size; b * c->block_size < len; b++) {
        int64_t block = (int64_t)table[b] * c->block_stride - (int64_t)b * c->block_size * width;
        for (int p = max_int(b * c->block_size, first); p < min_int((b + 1) * c->block_size, len); p++) {
            for (int g = 0, hq = 0; g < c->num_kv_heads; g++) {
                int64_t at = block + (int64_t)p * width + (int64_t)g * dims;
                vec v[MAX_CHUNKS];
                for (int x = 0; x < dims / LANES; x++) v[x] = load_vec(c->v_cache, c->bf16, at + x * LANES);
                for (int j = 0; j < group; j++, hq++)
                    axpy(out + (int64_t)hq * dims, scores[(int64_t)hq * n + (p - first)], v, c->v_cache, c->bf16, at,
                         dims);
            }
        }
    }
    for (int hq = 0; hq < c->num_q_heads; hq++)
        for (int d = 0; d < dims; d++) out[(int64_t)hq * dims + d] *= inv[hq];
}

/* One row, with `dims` a constant where the caller names one (the compiler then unrolls the
 * head_dim loops into whole vectors). */
INLINE void attend_row(const Cache *c, const int32_t *table, int first, int len, const float *qs, float *scores,
                       float *inv, float *out, int dims) {
    row_scores(c, table, first, len, qs, scores, dims);
    softmax_rows(scores, c->num_q_heads, len - first, inv);
    row_values(c, table, first, len, scores, inv, out, dims);
}

static void attend_row_any(const Cache *c, const int32_t *table, int first, int len, const float *qs, float *scores,
                           float *inv, float *out) {
    switch (c->head_dim) {
    case 32: attend_row(c, table, first, len, qs, scores, inv, out, 32); break;
    case 64: attend_row(c, table, first, len, qs, scores, inv, out, 64); break;
    case 128: attend_row(c, table, first, len, qs, scores, inv, out, 128); break;
    case 256: attend_row(c, table, first, len, qs, scores, inv, out, 256); break;
    default: attend_row(c, table, first, len, qs, scores, inv, out, c->head_dim);
    }
}

int paged_decode(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t block_stride,
                 const int32_t *tables, int64_t table_stride, const int32_t *lens, int rows, int num_q_heads,
                 int num_kv_heads, int head_dim, int block_size, float scale, int window, float *out) {
    Cache c = {k_cache, v_cache, block_stride, block_size, num_q_heads, num_kv_heads, head_dim, bf16};
    if (head_dim > MAX_CHUNKS * LANES) return -2;
    int max_len = 0;
    for (int r = 0; r < rows; r++) max_len = max_int(max_len, lens[r]);
    size_t row_dims = (size_t)num_q_heads * head_dim;
    float *scores = malloc(sizeof(float) * ((size_t)num_q_heads * (max_len + 1) + row_dims + num_q_heads));
    if (scores == NULL) return -1;
    float *qs = scores + (size_t)num_q_heads * (max_len + 1), *inv = qs + row_dims;
    for (int r = 0; r < rows; r++) {
        int len = lens[r], first = (window > 0 && len > window) ? len - window : 0;
        const int32_t *table = tables + (int64_t)r * table_stride;
        for (size_t i = 0; i < row_dims; i++) qs[i] = q[r * row_dims + i] * scale;
        attend_row_any(&c, table, first, len, qs, scores, inv, out + r * row_dims);
    }
    free(scores);
    return 0;
}

/* ---- Prefill: one request's chunk of query tokens over its context, causal ----
 * Per kv head, its K and V over the context are widened to fp32 once (reused by every tile of its
 * query heads). A tile is LANES consecutive tokens of one query head, the tokens across the vector
 * lanes: each key value is broadcast against LANES queries (no lane sums), and the weighted V sum
 * keeps up to TILE_REGS accumulators in registers. On this project's 2-core Zen 4 it ran
 * 1.2-2.1x torch's fused SDPA at head_dim 32 (256-2,048 tokens), but 0.75-1.4x at 64 and 128,
 * so paged_attention_cpu sends it head_dim <= 32 only (docs/benchmarks.md section 23). */

#define TILE_REGS 16 /* vector registers for a tile's V accumulators */

/* dst[p][d] = the kv head g's values of position p, fp32, for p < len. */
INLINE void widen_head(const Cache *c, const void *cache, const int32_t *table, int len, int g, float *dst,
                       int dims) {
    int width = c->num_kv_heads * dims;
    for (int p = 0; p < len; p++) {
        int64_t at = (int64_t)table[p / c->block_size] * c->block_stride + (int64_t)(p % c->block_size) * width
                     + (int64_t)g * dims;
        for (int x = 0; x < dims / LANES; x++) {
            vec v = load_vec(cache, c->bf16, at + x * LANES);
            memcpy(dst + (int64_t)p * dims + x * LANES, &v, sizeof v);
        }
        for (int d = dims / LANES * LANES; d < dims; d++) dst[(int64_t)p * dims + d] = load_one(cache, c->bf16, at + d);
    }
}

INLINE vec blend(lane_ids keep, vec a, vec b) {
    lane_ids ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    lane_ids r = (ia & keep) | (ib & ~keep);
    vec out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* Scores of LANES tokens (the lanes) against positions first..last: qt [dims] vectors, keys [len][dims];
 * a position a token must not see scores -inf. */
INLINE void tile_scores(const float *keys, const vec *qt, lane_ids pos, int first, int last, int window,
                        float *scores, int dims) {
    vec ninf;
    for (int l = 0; l < LANES; l++) ninf[l] = -INFINITY;
    for (int p = first; p <= last; p++) {
        const float *k = keys + (int64_t)p * dims;
        vec s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int d = 0;
        for (; d + 4 <= dims; d += 4) {
            s0 += qt[d] * k[d], s1 += qt[d + 1] * k[d + 1];
            s2 += qt[d + 2] * k[d + 2], s3 += qt[d + 3] * k[d + 3];
        }
        for (; d < dims; d++) s0 += qt[d] * k[d];
        lane_ids keep = p <= pos;
        if (window > 0) keep &= p > pos - window;
        vec s = blend(keep, (s0 + s1) + (s2 + s3), ninf);
        memcpy(scores + (int64_t)(p - first) * LANES, &s, sizeof s);
    }
}

/* out[t] = inv[t] * sum_p scores[p][t] v_p for the tile's `count` tokens, as many tokens' accumulators at a
 * time as fit in TILE_REGS vectors. */
INLINE void tile_values(const float *values, const float *scores, int first, int last, const float *inv, int count,
                        float *out, int64_t token_stride, int dims) {
    int ch = dims / LANES;
    int tg = ch >= TILE_REGS ? 1 : TILE_REGS / (ch > 0 ? ch : 1);
    if (tg > LANES) tg = LANES;
    for (int t0 = 0; t0 < count; t0 += tg) {
        int tn = min_int(tg, count - t0);
        vec acc[LANES][MAX_CHUNKS];
        for (int t = 0; t < tn; t++)
            for (int x = 0; x < ch; x++) acc[t][x] = (vec){0};
        float tail[LANES][LANES]; /* the head_dim values past the last whole vector */
        int rest = dims - ch * LANES;
        for (int t = 0; t < tn; t++)
            for (int d = 0; d < rest; d++) tail[t][d] = 0.0f;
        for (int p = first; p <= last; p++) {
            const float *v = values + (int64_t)p * dims, *w = scores + (int64_t)(p - first) * LANES + t0;
            for (int t = 0; t < tn; t++)
                for (int x = 0; x < ch; x++) {
                    vec vx;
                    memcpy(&vx, v + x * LANES, sizeof vx);
                    acc[t][x] += w[t] * vx;
                }
            for (int t = 0; t < tn; t++)
                for (int d = 0; d < rest; d++) tail[t][d] += w[t] * v[ch * LANES + d];
        }
        for (int t = 0; t < tn; t++) {
            float *o = out + (int64_t)(t0 + t) * token_stride;
            for (int x = 0; x < ch; x++) {
                vec r = acc[t][x] * inv[t0 + t];
                memcpy(o + x * LANES, &r, sizeof r);
            }
            for (int d = 0; d < rest; d++) o[ch * LANES + d] = tail[t][d] * inv[t0 + t];
        }
    }
}

INLINE void prefill_head(const float *q, const float *keys, const float *values, int len, int n, int h, int num_q_heads,
                         float scale, int window, float *scores, vec *qt, float *out, int dims) {
    int64_t token_stride = (int64_t)num_q_heads * dims;
    for (int t0 = 0; t0 < n; t0 += LANES) {
        int count = min_int(LANES, n - t0);
        lane_ids pos;
        for (int l = 0; l < LANES; l++) pos[l] = len - n + t0 + min_int(l, count - 1);
        for (int d = 0; d < dims; d++)
            for (int l = 0; l < LANES; l++) qt[d][l] = q[(t0 + min_int(l, count - 1)) * token_stride + h * dims + d] * scale;
        int last = pos[LANES - 1], first = window > 0 ? max_int(0, pos[0] - window + 1) : 0, m = last - first + 1;
        tile_scores(keys, qt, pos, first, last, window, scores, dims);
        float top[LANES], sum[LANES];
        for (int l = 0; l < LANES; l++) top[l] = -INFINITY, sum[l] = 0.0f;
        for (int i = 0; i < m; i++)
#pragma omp simd
            for (int l = 0; l < LANES; l++) top[l] = scores[i * LANES + l] > top[l] ? scores[i * LANES + l] : top[l];
        for (int i = 0; i < m; i++)
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                float e = exp_fast(scores[i * LANES + l] - top[l]);
                scores[i * LANES + l] = e;
                sum[l] += e;
            }
        for (int l = 0; l < LANES; l++) sum[l] = 1.0f / sum[l];
        tile_values(values, scores, first, last, sum, count, out + (int64_t)t0 * token_stride + h * dims, token_stride,
                    dims);
    }
}

INLINE void prefill_all(const Cache *c, const float *q, const int32_t *table, int len, int n, float scale, int window,
                        float *keys, float *values, float *scores, vec *qt, float *out, int dims) {
    int group = c->num_q_heads / c->num_kv_heads;
    for (int g = 0; g < c->num_kv_heads; g++) {
        widen_head(c, c->k_cache, table, len, g, keys, dims);
        widen_head(c, c->v_cache, table, len, g, values, dims);
        for (int j = 0; j < group; j++)
            prefill_head(q, keys, values, len, n, g * group + j, c->num_q_heads, scale, window, scores, qt, out, dims);
    }
}

/* One request's chunk: q [n, Hq, D] fp32 contiguous, the last n positions of its context of `len`,
 * each seeing the positions up to its own (with window > 0, only the last `window` of them); out
 * [n, Hq, D] fp32; table: the request's block ids. Returns 0, -1 without scratch memory, -2 for a
 * head_dim beyond MAX_CHUNKS * LANES. */
int paged_prefill(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t block_stride,
                  const int32_t *table, int len, int n, int num_q_heads, int num_kv_heads, int head_dim,
                  int block_size, float scale, int window, float *out) {
    if (head_dim > MAX_CHUNKS * LANES) return -2;
    Cache c = {k_cache, v_cache, block_stride, block_size, num_q_heads, num_kv_heads, head_dim, bf16};
    size_t kv = (size_t)len * head_dim;
    float *buf = aligned_alloc(64, ((2 * kv + (size_t)(len + 1) * LANES) * sizeof(float) + 63) / 64 * 64);
    vec *qt = aligned_alloc(64, (sizeof(vec) * (size_t)head_dim + 63) / 64 * 64);
    if (buf == NULL || qt == NULL) {
        free(buf), free(qt);
        return -1;
    }
    float *keys = buf, *values = buf + kv, *scores = buf + 2 * kv;
    switch (head_dim) {
    case 32: prefill_all(&c, q, table, len, n, scale, window, keys, values, scores, qt, out, 32); break;
    case 64: prefill_all(&c, q, table, len, n, scale, window, keys, values, scores, qt, out, 64); break;
    case 128: prefill_all(&c, q, table, len, n, scale, window, keys, values, scores, qt, out, 128); break;
    default: prefill_all(&c, q, table, len, n, scale, window, keys, values, scores, qt, out, head_dim);
    }
    free(buf), free(qt);
    return 0;
}
