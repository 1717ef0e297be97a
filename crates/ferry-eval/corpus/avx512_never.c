/* avx512-never: AVX-512 code is present in .text but unreachable at run
 * time (the branch depends on argc > 1000, laundered through a volatile so
 * the compiler cannot prove it dead). A tool that flags every instruction
 * in the binary would refuse migration; the process never executes it, so
 * it can in fact run on any x86-64 CPU. */
#include <immintrin.h>

#include "ferry.h"

#define N 16384

static uint32_t a[N], b[N];
static volatile int argc_seen;

__attribute__((target("avx512f"), noinline))
static uint32_t sum_avx512(const uint32_t *x, const uint32_t *y, size_t n)
{
    __m512i acc = _mm512_setzero_si512();
    for (size_t i = 0; i < n; i += 16)
        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(
                                        _mm512_loadu_si512(x + i),
                                        _mm512_loadu_si512(y + i)));
    return (uint32_t)_mm512_reduce_add_epi32(acc);
}

__attribute__((noinline))
static uint32_t sum_base(const uint32_t *x, const uint32_t *y, size_t n)
{
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc += x[i] * y[i];
    return acc;
}

int main(int argc, char **argv)
{
    (void)argv;
    const char *f = ferry_forced();
    if (f && !ferry_eq(f, "none"))
        ferry_bad_force(f);
    argc_seen = argc;

    ferry_fill(a, N, 61);
    ferry_fill(b, N, 62);

    ferry_block_usr1();
    ferry_ready("none");
    ferry_wait();

    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++) {
        size_t n = N - 16 * rep;
        uint32_t v = argc_seen > 1000 ? sum_avx512(a, b, n) : sum_base(a, b, n);
        r = r * 1000003u + v;
    }
    ferry_result(r);
    ferry_exit();
}
