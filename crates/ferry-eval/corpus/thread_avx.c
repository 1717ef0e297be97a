/* thread-avx: main never executes AVX. A worker thread, created at setup,
 * is parked in read(2) on a pipe while the process waits to migrate; only
 * after main releases it in the work phase does it run the AVX2 (or
 * baseline) kernel. The interesting state is in a non-main thread's stack
 * and registers, not in main's. */
#include <pthread.h>

#include "ferry.h"
#include "dot.h"

#define N 16384

static uint32_t a[N], b[N];
static dot_fn kernel;
static int go[2];
static uint64_t answer;

static void *worker(void *arg)
{
    (void)arg;
    char c;
    while (read(go[0], &c, 1) != 1) {}
    uint64_t r = 0;
    for (int rep = 0; rep < 8; rep++)
        r = r * 1000003u + kernel(a, b, N - 8 * rep);
    answer = r;
    return NULL;
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

    ferry_fill(a, N, 71);
    ferry_fill(b, N, 72);

    ferry_block_usr1();  /* before pthread_create: the worker inherits it */
    pthread_t t;
    if (pipe(go) != 0 || pthread_create(&t, NULL, worker, NULL) != 0)
        exit(2);
    ferry_ready(d);
    ferry_wait();

    if (write(go[1], "g", 1) != 1 || pthread_join(t, NULL) != 0)
        exit(2);
    ferry_result(answer);
    ferry_exit();
}
