/* march-v1..v4: one source, no explicit dispatch. Whatever ISA the -march
 * level lets gcc -O3 use in these loops is what the work phase needs.
 * The loops are chosen so each level really emits its own instructions:
 *   v2: popcnt (SSE4.2-era), pmulld (SSE4.1) for the 32-bit multiply;
 *   v3: ymm AVX2 integer/float ops, FMA for the saxpy, BMI/BMI2 scalar ops;
 *   v4: 64-bit multiply and arithmetic shift (vpmullq/vpsraq exist only in
 *       AVX-512), so even with gcc's 256-bit preference it emits EVEX code. */
#include "ferry.h"

#define N 4096

static uint32_t a[N], b[N], c[N];
static int64_t s[N], d[N];
static float x[N], y[N];

__attribute__((noinline)) static void int_loop(void)
{
    for (int i = 0; i < N; i++)
        c[i] = a[i] * b[i] + (a[i] >> 3);
}

/* Values are small integers, so fused and unfused multiply-add round the
 * same: the result does not depend on whether gcc contracts to FMA. */
__attribute__((noinline)) static void float_loop(void)
{
    for (int i = 0; i < N; i++)
        y[i] = 3.0f * x[i] + y[i];
}

__attribute__((noinline)) static void i64_loop(void)
{
    for (int i = 0; i < N; i++)
        d[i] = (s[i] * 7) >> 2;
}

__attribute__((noinline)) static uint64_t popcount_sum(void)
{
    uint64_t t = 0;
    for (int i = 0; i < N; i++)
        t += (uint64_t)__builtin_popcountll(((uint64_t)a[i] << 32) | b[i]);
    return t;
}

int main(void)
{
    const char *f = ferry_forced();
    if (f && !ferry_eq(f, "none"))
        ferry_bad_force(f);

    /* Setup stays integer and serial: at -march=x86-64-v3 even scalar float
     * code is VEX-encoded, so anything more here would trap under an older
     * CPU model before "ready" rather than in the work phase. */
    ferry_fill(a, N, 1);
    ferry_fill(b, N, 2);

    ferry_block_usr1();
    ferry_ready("none");
    ferry_wait();

    for (int i = 0; i < N; i++) {
        x[i] = (float)(a[i] & 1023);
        y[i] = (float)(b[i] & 1023);
        s[i] = (int64_t)(a[i] & 0xffff) - 0x8000;
    }
    uint64_t r = 0;
    for (int rep = 0; rep < 4; rep++) {
        int_loop();
        float_loop();
        i64_loop();
        r += popcount_sum();
    }
    for (int i = 0; i < N; i++)
        r = r * 31 + c[i] + (uint64_t)(int64_t)y[i] + (uint64_t)d[i];
    ferry_result(r);
    ferry_exit();
}
