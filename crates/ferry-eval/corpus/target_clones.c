/* target-clones: gcc emits one copy of work() per target plus an ifunc
 * resolver (work.resolver) that picks one with __builtin_cpu_supports.
 * Unforced, the program calls the ifunc'ed symbol like a normal program
 * would and reports what the resolver will have picked. Forced, it must
 * bypass the resolver (which only looks at the CPU) and call the named
 * clone directly; gcc 12 names them work.avx2 and work.default (local symbols,
 * so they can only be referenced from this translation unit). */
#include "ferry.h"

#define N 16384

static uint32_t a[N], b[N];

/* Plain C: the avx2 clone is auto-vectorised with ymm at -O3, the default
 * clone with SSE2. Non-static so gcc keeps the clone names unmangled. */
__attribute__((target_clones("avx2", "default"), noinline))
uint32_t work(const uint32_t *x, const uint32_t *y, size_t n)
{
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc += x[i] * y[i] + (x[i] >> 5);
    return acc;
}

extern uint32_t work_avx2(const uint32_t *, const uint32_t *, size_t)
    __asm__("work.avx2");
extern uint32_t work_default(const uint32_t *, const uint32_t *, size_t)
    __asm__("work.default");

/* Which entry the work phase calls: the ifunc'ed symbol or one clone. */
enum { VIA_IFUNC, VIA_AVX2, VIA_DEFAULT };

static uint32_t call(int via, size_t n)
{
    switch (via) {
    case VIA_AVX2:
        return work_avx2(a, b, n);
    case VIA_DEFAULT:
        return work_default(a, b, n);
    default:
        return work(a, b, n);
    }
}

int main(void)
{
    const char *d = ferry_forced();
    int via = VIA_IFUNC;
    if (!d)
        d = __builtin_cpu_supports("avx2") ? "avx2" : "default";
    else if (ferry_eq(d, "avx2"))
        via = VIA_AVX2;
    else if (ferry_eq(d, "default"))
        via = VIA_DEFAULT;
    else
        ferry_bad_force(d);

    ferry_fill(a, N, 31);
    ferry_fill(b, N, 32);

    ferry_block_usr1();
    ferry_ready(d);
    ferry_wait();

    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++)
        r = r * 1000003u + call(via, N - 8 * rep);
    ferry_result(r);
    ferry_exit();
}
