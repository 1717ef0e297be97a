/* jit-avx2: the AVX2 code exists only in an anonymous RX mapping written at
 * setup, never in any file, so only a tool that reads the live process
 * memory can see it. Both routines are uint32_t sum(const uint32_t *p,
 * size_t n) (SysV: rdi = p, rsi = n, n > 0 and a multiple of the vector
 * width), returning the wrapping sum of p[0..n). */
#include <string.h>
#include <sys/mman.h>

#include "ferry.h"

#define N 16384

static uint32_t a[N], b[N];

static const unsigned char code_avx2[] = {
    0xc5, 0xfd, 0xef, 0xc0,             /* vpxor   ymm0, ymm0, ymm0      */
    0xc5, 0xfe, 0x6f, 0x0f,             /* 1: vmovdqu ymm1, [rdi]        */
    0xc5, 0xfd, 0xfe, 0xc1,             /* vpaddd  ymm0, ymm0, ymm1      */
    0x48, 0x83, 0xc7, 0x20,             /* add     rdi, 32               */
    0x48, 0x83, 0xee, 0x08,             /* sub     rsi, 8                */
    0x75, 0xee,                         /* jnz     1b                    */
    0xc4, 0xe3, 0x7d, 0x39, 0xc1, 0x01, /* vextracti128 xmm1, ymm0, 1    */
    0xc5, 0xf9, 0xfe, 0xc1,             /* vpaddd  xmm0, xmm0, xmm1      */
    0xc5, 0xf9, 0x70, 0xc8, 0x4e,       /* vpshufd xmm1, xmm0, 0x4e      */
    0xc5, 0xf9, 0xfe, 0xc1,             /* vpaddd  xmm0, xmm0, xmm1      */
    0xc5, 0xf9, 0x70, 0xc8, 0xb1,       /* vpshufd xmm1, xmm0, 0xb1      */
    0xc5, 0xf9, 0xfe, 0xc1,             /* vpaddd  xmm0, xmm0, xmm1      */
    0xc5, 0xf9, 0x7e, 0xc0,             /* vmovd   eax, xmm0             */
    0xc5, 0xf8, 0x77,                   /* vzeroupper                    */
    0xc3,                               /* ret                           */
};

static const unsigned char code_sse2[] = {
    0x66, 0x0f, 0xef, 0xc0,             /* pxor    xmm0, xmm0            */
    0xf3, 0x0f, 0x6f, 0x0f,             /* 1: movdqu xmm1, [rdi]         */
    0x66, 0x0f, 0xfe, 0xc1,             /* paddd   xmm0, xmm1            */
    0x48, 0x83, 0xc7, 0x10,             /* add     rdi, 16               */
    0x48, 0x83, 0xee, 0x04,             /* sub     rsi, 4                */
    0x75, 0xee,                         /* jnz     1b                    */
    0x66, 0x0f, 0x70, 0xc8, 0x4e,       /* pshufd  xmm1, xmm0, 0x4e      */
    0x66, 0x0f, 0xfe, 0xc1,             /* paddd   xmm0, xmm1            */
    0x66, 0x0f, 0x70, 0xc8, 0xb1,       /* pshufd  xmm1, xmm0, 0xb1      */
    0x66, 0x0f, 0xfe, 0xc1,             /* paddd   xmm0, xmm1            */
    0x66, 0x0f, 0x7e, 0xc0,             /* movd    eax, xmm0             */
    0xc3,                               /* ret                           */
};

typedef uint32_t (*sum_fn)(const uint32_t *p, size_t n);

/* W^X like a real JIT: write while RW, then flip to RX. */
static sum_fn jit(const unsigned char *code, size_t len)
{
    void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        exit(2);
    memcpy(m, code, len);
    if (mprotect(m, 4096, PROT_READ | PROT_EXEC) != 0)
        exit(2);
    return (sum_fn)m;
}

int main(void)
{
    const char *d = ferry_forced();
    if (!d) {
        __builtin_cpu_init();
        d = __builtin_cpu_supports("avx2") ? "avx2" : "sse2";
    }
    sum_fn sum = NULL;
    if (ferry_eq(d, "avx2"))
        sum = jit(code_avx2, sizeof code_avx2);
    else if (ferry_eq(d, "sse2"))
        sum = jit(code_sse2, sizeof code_sse2);
    else
        ferry_bad_force(d);

    ferry_fill(a, N, 51);
    ferry_fill(b, N, 52);

    ferry_block_usr1();
    ferry_ready(d);
    ferry_wait();

    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++) {
        r = r * 1000003u + sum(a, N - 8 * rep);
        r = r * 1000003u + sum(b, N - 16 * rep);
    }
    ferry_result(r);
    ferry_exit();
}
