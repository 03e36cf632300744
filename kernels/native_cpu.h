/* What the C kernels of this folder share; each .c file includes it, and native_cpu.py keys its
 * build cache on this header's bytes as well as the source's. */

#ifndef SPLITSERVE_NATIVE_CPU_H
#define SPLITSERVE_NATIVE_CPU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* Element i as fp32: an fp32 tensor's own, or a bf16 one's widened (bf16 is the top half of an fp32). */
INLINE float load_one(const void *p, int bf16, int64_t i) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* e^x in fp32, vectorisable (libm's expf is not, and was most of the decode kernel's time):
 * 2^(x log2 e) as 2^n times a degree-6 polynomial of 2^f on f in [-0.5, 0.5]; relative error
 * ~2e-7. Below -87 the result is 0 (fp32 underflow, as for expf's denormals, which neither a
 * softmax sum nor 1 + e^x notices), above 88.7 +inf. */
INLINE float exp_fast(float x) {
    float t = (x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x) * 1.44269504088896341f;
    float n = floorf(t + 0.5f), f = t - n;
    float p = 1.53533059e-4f;
    p = p * f + 1.33989095e-3f;
    p = p * f + 9.61813331e-3f;
    p = p * f + 5.55041070e-2f;
    p = p * f + 2.40226504e-1f;
    p = p * f + 6.93147182e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : x > 88.7f ? INFINITY : p * scale;
}

#endif
