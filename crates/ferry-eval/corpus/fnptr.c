/* fnptr: classic runtime dispatch through a global function pointer.
 * The pointer is chosen once at setup; the work phase only calls through it,
 * so which ISA the work needs is decided by data (the pointer's value), not
 * by anything visible at the call site. */
#include "ferry.h"
#include "dot.h"

#define N 16384

static uint32_t a[N], b[N];

static const struct {
    const char *name;
    dot_fn fn;
} table[] = {
    {"avx2", dot_avx2},
    {"sse42", dot_sse42},
    {"scalar", dot_scalar},
};

/* Global (not a local) so the chosen target lives in memory, as in real
 * programs that dispatch once and call many times. */
dot_fn work;

int main(void)
{
    const char *d = ferry_forced();
    if (!d) {
        __builtin_cpu_init();
        d = __builtin_cpu_supports("avx2")     ? "avx2"
            : __builtin_cpu_supports("sse4.2") ? "sse42"
                                               : "scalar";
    }
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (ferry_eq(d, table[i].name))
            work = table[i].fn;
    if (!work)
        ferry_bad_force(d);

    ferry_fill(a, N, 11);
    ferry_fill(b, N, 12);

    ferry_block_usr1();
    ferry_ready(d);
    ferry_wait();

    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++)
        r = r * 1000003u + work(a, b, N - 8 * rep);
    ferry_result(r);
    ferry_exit();
}
