/* libavx2work.so: built entirely with -mavx2, so the AVX2 code exists only
 * in a library that is mapped into the process when (and only when) the
 * program decides to use it. No libc calls: nothing to resolve lazily. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

uint32_t avx2_work(const uint32_t *a, const uint32_t *b, size_t n)
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
