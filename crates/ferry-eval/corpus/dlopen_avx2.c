/* dlopen-avx2: the AVX2 code is not in the executable at all; it arrives
 * with a library dlopen'ed at setup, so a tool that only scans the main
 * binary misses it. Dynamic glibc: link with -z now so no lazy PLT binding
 * (glibc's _dl_runtime_resolve uses XSAVE/XSAVEC picked for the source CPU)
 * happens in the work phase. */
#include <dlfcn.h>
#include <stdio.h>

#include "ferry.h"

#define N 16384

typedef uint32_t (*dot_fn)(const uint32_t *, const uint32_t *, size_t);

static uint32_t a[N], b[N];

__attribute__((noinline))
static uint32_t scalar_work(const uint32_t *x, const uint32_t *y, size_t n)
{
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc += x[i] * y[i];
    return acc;
}

static dot_fn load_avx2(void)
{
    const char *dir = getenv("FERRY_LIBDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/libavx2work.so", dir ? dir : ".");
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    dot_fn f = h ? (dot_fn)dlsym(h, "avx2_work") : NULL;
    if (!f) {
        fprintf(stderr, "dlopen-avx2: %s\n", dlerror());
        exit(2);
    }
    return f;
}

int main(void)
{
    const char *d = ferry_forced();
    if (!d) {
        __builtin_cpu_init();
        d = __builtin_cpu_supports("avx2") ? "avx2" : "scalar";
    }
    dot_fn work = NULL;
    if (ferry_eq(d, "avx2"))
        work = load_avx2();
    else if (ferry_eq(d, "scalar"))
        work = scalar_work;
    else
        ferry_bad_force(d);

    ferry_fill(a, N, 41);
    ferry_fill(b, N, 42);

    ferry_block_usr1();
    ferry_ready(d);
    ferry_wait();

    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++)
        r = r * 1000003u + work(a, b, N - 8 * rep);
    ferry_result(r);
    ferry_exit();
}
