/* ifunc: dispatch done by the dynamic-linking machinery. In a static glibc
 * binary the resolver runs from __libc_start_main (IRELATIVE relocations),
 * before constructors, TLS and main, and the chosen address sits in the
 * .got/.iplt slot. The resolver therefore must not use libc string code
 * (glibc's own ifuncs may not be relocated yet), nor TLS (stack protector
 * reads %fs:0x28): it scans __environ by hand. */
#include "ferry.h"
#include "dot.h"

#define N 16384

extern char **__environ;

static uint32_t a[N], b[N];
static const char *chosen;  /* decision, for the ready line */
static const char *bad;     /* unknown forced token, reported by main */

/* Returns the value of FERRY_FORCE or NULL, without libc. */
__attribute__((no_stack_protector))
static const char *env_force(void)
{
    static const char key[] = "FERRY_FORCE=";
    for (char **e = __environ; e && *e; e++) {
        const char *p = *e;
        size_t i = 0;
        while (key[i] && p[i] == key[i])
            i++;
        if (!key[i] && p[i])
            return p + i;
    }
    return NULL;
}

__attribute__((no_stack_protector))
static dot_fn resolve_work(void)
{
    const char *f = env_force();
    if (f) {
        chosen = f;
        if (ferry_eq(f, "avx2"))
            return dot_avx2;
        if (ferry_eq(f, "sse42"))
            return dot_sse42;
        if (ferry_eq(f, "scalar"))
            return dot_scalar;
        bad = f;
        return dot_scalar;
    }
    /* libgcc's CPU model is filled by a constructor that has not run yet. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return chosen = "avx2", dot_avx2;
    if (__builtin_cpu_supports("sse4.2"))
        return chosen = "sse42", dot_sse42;
    return chosen = "scalar", dot_scalar;
}

uint32_t work(const uint32_t *a, const uint32_t *b, size_t n)
    __attribute__((ifunc("resolve_work")));

int main(void)
{
    if (bad)
        ferry_bad_force(bad);

    ferry_fill(a, N, 21);
    ferry_fill(b, N, 22);

    ferry_block_usr1();
    ferry_ready(chosen);
    ferry_wait();

    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++)
        r = r * 1000003u + work(a, b, N - 8 * rep);
    ferry_result(r);
    ferry_exit();
}
