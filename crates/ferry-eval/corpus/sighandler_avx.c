/* sighandler-avx: the AVX2 code is reachable only from a SIGUSR2 handler
 * installed at setup. Nothing on main's call path references it; a tool
 * must consider the process's installed handlers to find it. */
#include <string.h>

#include "ferry.h"
#include "dot.h"

#define N 16384

static uint32_t a[N], b[N];
static dot_fn kernel;
static volatile uint64_t answer;

static void on_usr2(int sig)
{
    (void)sig;
    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++)
        r = r * 1000003u + kernel(a, b, N - 8 * rep);
    answer = r;
}

int main(void)
{
    const char *d = ferry_forced();
    if (!d) {
        __builtin_cpu_init();
        d = __builtin_cpu_supports("avx2") ? "avx2" : "sse2";
    }
    if (ferry_eq(d, "avx2"))
        kernel = dot_avx2;
    else if (ferry_eq(d, "sse2"))
        kernel = dot_scalar;
    else
        ferry_bad_force(d);

    ferry_fill(a, N, 81);
    ferry_fill(b, N, 82);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR2, &sa, NULL) != 0)
        exit(2);

    ferry_block_usr1();
    ferry_ready(d);
    ferry_wait();

    raise(SIGUSR2);
    ferry_result(answer);
    ferry_exit();
}
