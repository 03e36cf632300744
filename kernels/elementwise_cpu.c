/* A decoder layer's small ops on CPU tensors, one call each instead of the reference's five to
 * fifteen torch ops: RMSNorm (with the residual add), SwiGLU's silu(gate) * up, neox rotary, and the
 * KV cache write. Built and loaded by elementwise_cpu.py; compiled with -ffp-contract=off, so
 * every product and sum is rounded where torch rounds it (rotary and the cache write are then
 * bit-identical to the references).
 *
 * Tensors are fp32 or bf16 (`bf16` says which, for all of a call's tensors but the fp32 cos/sin
 * table); a row's values are contiguous, rows `*_stride` elements apart. bf16 values are widened to
 * fp32 exactly and rounded back to the nearest even, as torch's `.to(torch.bfloat16)` does. */

#include "native_cpu.h"

/* Each exported function calls its INLINE body with `bf16` a constant, so the compiler drops the
 * dtype branches from the loops and vectorises them. */
#define BY_DTYPE(bf16, call) ((bf16) ? call(1) : call(0))

/* fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN. */
INLINE uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

INLINE void store(void *p, int bf16, int64_t i, float x) {
    if (bf16)
        ((uint16_t *)p)[i] = to_bf16(x);
    else
        ((float *)p)[i] = x;
}

/* The value as the tensor's dtype holds it (a bf16 intermediate that torch rounds). */
INLINE float round_to(int bf16, float x) {
    if (!bf16) return x;
    uint32_t bits = (uint32_t)to_bf16(x) << 16;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* out[r] = w * (s * rsqrt(mean(s^2) + eps)), s = x[r] + residual[r] rounded (and written to
 * residual_out[r]) when `residual` is given, else x[r]; rounded as rms_norm_ref rounds: the
 * normalised row, then its product with the weight. out and residual_out are contiguous. */
INLINE void rms_norm_rows(const void *x, int64_t x_stride, const void *residual, int64_t residual_stride,
                          void *residual_out, const void *weight, void *out, int rows, int hidden, float eps, int bf16) {
    for (int r = 0; r < rows; r++) {
        int64_t at = (int64_t)r * hidden, src_at = r * x_stride;
        const void *src = x;
        if (residual != NULL) {
#pragma omp simd
            for (int i = 0; i < hidden; i++)
                store(residual_out, bf16, at + i, load_one(x, bf16, src_at + i) + load_one(residual, bf16, r * residual_stride + i));
            src = residual_out, src_at = at;
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int i = 0; i < hidden; i++) {
            float s = load_one(src, bf16, src_at + i);
            squares += s * s;
        }
        float inv = 1.0f / sqrtf(squares / (float)hidden + eps);
#pragma omp simd
        for (int i = 0; i < hidden; i++)
            store(out, bf16, at + i, load_one(weight, bf16, i) * round_to(bf16, load_one(src, bf16, src_at + i) * inv));
    }
}

int rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t residual_stride, void *residual_out,
             const void *weight, void *out, int rows, int hidden, float eps, int bf16) {
#define RMS_NORM(b) rms_norm_rows(x, x_stride, residual, residual_stride, residual_out, weight, out, rows, hidden, eps, b)
    BY_DTYPE(bf16, RMS_NORM);
    return 0;
}

/* out[r][i] = silu(x[r][i]) * x[r][inter + i] in fp32, rounded once; out is contiguous. */
INLINE void silu_and_mul_rows(const void *x, int64_t x_stride, void *out, int rows, int inter, int bf16) {
    for (int r = 0; r < rows; r++) {
#pragma omp simd
        for (int i = 0; i < inter; i++) {
            float gate = load_one(x, bf16, r * x_stride + i), up = load_one(x, bf16, r * x_stride + inter + i);
            store(out, bf16, (int64_t)r * inter + i, gate / (1.0f + exp_fast(-gate)) * up);
        }
    }
}

int silu_and_mul(const void *x, int64_t x_stride, void *out, int rows, int inter, int bf16) {
#define SILU_AND_MUL(b) silu_and_mul_rows(x, x_stride, out, rows, inter, b)
    BY_DTYPE(bf16, SILU_AND_MUL);
    return 0;
}

/* Neox rotary of every head of every token: x = x1 ‖ x2 (halves of `dim`), out = (x1 cos - x2 sin)
 * ‖ (x2 cos + x1 sin) in fp32, cos ‖ sin the row cos_sin[positions[t]] (`table_stride` floats
 * apart). x: [tokens, heads, dim] with strides; out: contiguous. */
INLINE void rotary_heads(const int64_t *positions, const void *x, int64_t token_stride, int64_t head_stride,
                         void *out, int tokens, int heads, int dim, const float *cos_sin, int64_t table_stride,
                         int bf16) {
    int half = dim / 2;
    for (int t = 0; t < tokens; t++) {
        const float *cos = cos_sin + positions[t] * table_stride, *sin = cos + half;
        for (int h = 0; h < heads; h++) {
            int64_t src = t * token_stride + h * head_stride, dst = ((int64_t)t * heads + h) * dim;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float x1 = load_one(x, bf16, src + i), x2 = load_one(x, bf16, src + half + i);
                float a = x1 * cos[i], b = x2 * sin[i], c = x2 * cos[i], d = x1 * sin[i];
                store(out, bf16, dst + i, a - b);
                store(out, bf16, dst + half + i, c + d);
            }
        }
    }
}

int rotary(const int64_t *positions, const void *x, int64_t token_stride, int64_t head_stride, void *out,
           int tokens, int heads, int dim, const float *cos_sin, int64_t table_stride, int bf16) {
#define ROTARY(b) rotary_heads(positions, x, token_stride, head_stride, out, tokens, heads, dim, cos_sin, table_stride, b)
    BY_DTYPE(bf16, ROTARY);
    return 0;
}

/* cache[slot / block_size][slot % block_size][h] = src[t][h] for every token whose slot >= 0, for
 * K and V; `bytes` per head row (the same dtype on both sides). A cache block's [block_size,
 * heads, dim] values are contiguous, blocks `block_stride` bytes apart. */
int write_kv(const void *k, int64_t k_token, int64_t k_head, const void *v, int64_t v_token, int64_t v_head,
             void *k_cache, void *v_cache, int64_t block_stride, const int64_t *slots, int tokens, int heads,
             int bytes, int block_size) {
    for (int t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        int64_t at = (slots[t] / block_size) * block_stride + (slots[t] % block_size) * (int64_t)heads * bytes;
        for (int h = 0; h < heads; h++) {
            memcpy((char *)k_cache + at + (int64_t)h * bytes, (const char *)k + t * k_token + h * k_head, bytes);
            memcpy((char *)v_cache + at + (int64_t)h * bytes, (const char *)v + t * v_token + h * v_head, bytes);
        }
    }
    return 0;
}
