/* Three implementations of the same 32-bit wrapping dot product, used by the
 * dispatching programs. Intrinsics (not auto-vectorisation) so each variant
 * is guaranteed to contain its ISA whatever the optimisation level:
 *   dot_avx2  : vpmulld/vpaddd on ymm          -> needs AVX2
 *   dot_sse42 : pmulld (SSE4.1) + a crc32 (SSE4.2) folded in as a no-op
 *   dot_scalar: plain C, vectoriser off        -> baseline x86-64
 * All return the same value for the same input. n must be a multiple of 8. */
#ifndef FERRY_DOT_H
#define FERRY_DOT_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

typedef uint32_t (*dot_fn)(const uint32_t *a, const uint32_t *b, size_t n);

__attribute__((target("avx2"), noinline, unused))
static uint32_t dot_avx2(const uint32_t *a, const uint32_t *b, size_t n)
{
    __m256i acc = _mm256_setzero_si256();
    for (size_t i = 0; i < n; i += 8) {
        __m256i va = _mm256_loadu_si256((const __m256i *)(a + i));
        __m256i vb = _mm256_loadu_si256((const __m256i *)(b + i));
        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(va, vb));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc),
                              _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return (uint32_t)_mm_cvtsi128_si32(s);
}

__attribute__((target("sse4.2"), noinline, unused))
static uint32_t dot_sse42(const uint32_t *a, const uint32_t *b, size_t n)
{
    __m128i acc = _mm_setzero_si128();
    for (size_t i = 0; i < n; i += 4) {
        __m128i va = _mm_loadu_si128((const __m128i *)(a + i));
        __m128i vb = _mm_loadu_si128((const __m128i *)(b + i));
        acc = _mm_add_epi32(acc, _mm_mullo_epi32(va, vb));
    }
    acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4e));
    acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xb1));
    uint32_t r = (uint32_t)_mm_cvtsi128_si32(acc);
    /* crc32 makes this path need SSE4.2 proper, not just SSE4.1; the
     * asm keeps it from being folded away, and "& 0" keeps r unchanged. */
    uint32_t c = 0;
    __asm__ volatile("crc32l %1, %0" : "+r"(c) : "r"(r));
    return r + (c & 0);
}

__attribute__((optimize("no-tree-vectorize"), noinline, unused))
static uint32_t dot_scalar(const uint32_t *a, const uint32_t *b, size_t n)
{
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc += a[i] * b[i];
    return acc;
}

#endif
