/* lzcnt0: LZCNT (F3 0F BD) decodes as REP BSR on CPUs without LZCNT/ABM,
 * so running the lzcnt path there does not trap: it silently computes
 * something else. For input 0, LZCNT gives 64 while BSR sets ZF and leaves
 * the destination unchanged (AMD; "undefined" on Intel), i.e. the value we
 * preloaded. This entry's expected outcome on such CPUs is a wrong result,
 * not SIGILL. */
#include <cpuid.h>

#include "ferry.h"

static volatile uint64_t zero = 0;

__attribute__((noinline)) static uint64_t clz_lzcnt(uint64_t x)
{
    uint64_t r = 0x5a5a; /* what a BSR leaves behind for x == 0 */
    __asm__("lzcnt %1, %0" : "+r"(r) : "rm"(x) : "cc");
    return r;
}

__attribute__((noinline)) static uint64_t clz_bsr(uint64_t x)
{
    if (x == 0)
        return 64;
    uint64_t r;
    __asm__("bsr %1, %0" : "=r"(r) : "rm"(x) : "cc");
    return 63 - r;
}

static int has_lzcnt(void)
{
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(0x80000001, &eax, &ebx, &ecx, &edx))
        return 0;
    return (ecx >> 5) & 1; /* CPUID.80000001H:ECX.ABM/LZCNT[bit 5] */
}

int main(void)
{
    const char *d = ferry_forced();
    if (!d)
        d = has_lzcnt() ? "lzcnt" : "bsr";
    uint64_t (*clz)(uint64_t) = NULL;
    if (ferry_eq(d, "lzcnt"))
        clz = clz_lzcnt;
    else if (ferry_eq(d, "bsr"))
        clz = clz_bsr;
    else
        ferry_bad_force(d);

    ferry_block_usr1();
    ferry_ready(d);
    ferry_wait();

    /* Natively both paths agree on all three inputs. Run as BSR, the lzcnt
     * path gets 0 wrong (leftover register) and the others too (BSR yields
     * the bit index, not the count). */
    uint64_t r = clz(zero);
    r = r * 1000 + clz(zero + 1);
    r = r * 1000 + clz(zero + 0x80000000u);
    ferry_result(r);
    ferry_exit();
}
