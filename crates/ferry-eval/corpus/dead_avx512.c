/* dead-avx512: an exported AVX-512 function that nothing calls or points to. The linker keeps
 * it (external linkage, no --gc-sections), so a whole-binary scan sees AVX-512; no path of the
 * running process reaches it, so the process runs on any x86-64 CPU. */
#include <immintrin.h>

#include "ferry.h"

#define N 4096

static uint32_t a[N];

__attribute__((target("avx512f"), noinline, used))
uint32_t ferry_dead_sum_avx512(const uint32_t *x, size_t n)
{
    __m512i acc = _mm512_setzero_si512();
    for (size_t i = 0; i < n; i += 16)
        acc = _mm512_add_epi32(acc, _mm512_loadu_si512(x + i));
    return (uint32_t)_mm512_reduce_add_epi32(acc);
}

int main(void)
{
    const char *f = ferry_forced();
    if (f && !ferry_eq(f, "none"))
        ferry_bad_force(f);
    ferry_fill(a, N, 71);
    ferry_block_usr1();
    ferry_ready("none");
    ferry_wait();
    uint64_t r = 0;
    for (size_t i = 0; i < N; i++)
        r = r * 31 + a[i];
    ferry_result(r);
    ferry_exit();
}
