/* Protocol helpers shared by every corpus program (header only; it is found
 * next to the including source, so compile sources by their corpus path).
 *
 * Protocol: setup (dispatch decision, honouring FERRY_FORCE) -> one line
 * "ready dispatch=<d>" -> wait for SIGUSR1 in sigwait (unless FERRY_NOWAIT)
 * -> work phase -> "result=<n>" -> exit 0.
 *
 * Everything that may run after "ready" (ferry_result, ferry_exit) uses only
 * raw write(2)/_exit(2) and hand-written loops, so no libc routine that
 * dispatches on the CPU itself (glibc's ifunc'ed memcpy/strlen/...) runs in
 * the work phase: the work phase must execute only the code path chosen at
 * setup, nothing the libc chose on its own. */
#ifndef FERRY_H
#define FERRY_H

#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define FERRY_UNUSED __attribute__((unused))

/* Decision forced by the harness, or NULL to let the program detect. */
static FERRY_UNUSED const char *ferry_forced(void)
{
    const char *f = getenv("FERRY_FORCE");
    return (f && *f) ? f : NULL;
}

static FERRY_UNUSED int ferry_eq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static FERRY_UNUSED void ferry_write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w <= 0)
            _exit(3);
        p += w;
        n -= (size_t)w;
    }
}

/* A forced token the program does not know is a harness bug: fail loudly
 * rather than silently running some other path. */
static FERRY_UNUSED void ferry_bad_force(const char *tok)
{
    static const char msg[] = "ferry: unknown FERRY_FORCE token: ";
    size_t n = 0;
    if (write(2, msg, sizeof msg - 1) < 0) {}
    while (tok[n])
        n++;
    if (write(2, tok, n) < 0 || write(2, "\n", 1) < 0) {}
    _exit(2);
}

/* Must be called before any thread is created so every thread inherits the
 * mask and a process-directed SIGUSR1 stays pending for main's sigwait. */
static FERRY_UNUSED void ferry_block_usr1(void)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, NULL);
}

/* Prints the ready line in a single write so a reader never sees half. */
static FERRY_UNUSED void ferry_ready(const char *decision)
{
    static const char pre[] = "ready dispatch=";
    char buf[128];
    size_t n = 0;
    for (size_t i = 0; pre[i]; i++)
        buf[n++] = pre[i];
    for (size_t i = 0; decision[i] && n < sizeof buf - 1; i++)
        buf[n++] = decision[i];
    buf[n++] = '\n';
    ferry_write_all(buf, n);
}

/* Main sits in rt_sigtimedwait here, so its frame is on the stack while the
 * migration tool inspects the process. */
static FERRY_UNUSED void ferry_wait(void)
{
    if (getenv("FERRY_NOWAIT"))
        return;
    sigset_t s;
    int sig = 0;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    while (sigwait(&s, &sig) != 0 || sig != SIGUSR1) {}
}

/* Work-phase output: hand-formatted, one write(2). The prefix is stored
 * char by char so the compiler cannot turn it into a memcpy call. */
static FERRY_UNUSED void ferry_result(uint64_t v)
{
    char buf[32];
    int i = sizeof buf;
    buf[--i] = '\n';
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    buf[--i] = '=';
    buf[--i] = 't';
    buf[--i] = 'l';
    buf[--i] = 'u';
    buf[--i] = 's';
    buf[--i] = 'e';
    buf[--i] = 'r';
    ferry_write_all(buf + i, sizeof buf - i);
}

/* _exit skips atexit/stdio teardown, which in glibc may call ifunc'ed
 * string routines after the work phase. */
static FERRY_UNUSED void ferry_exit(void)
{
    _exit(0);
}

/* Deterministic input data, filled at setup. The LCG's serial dependency
 * keeps the compiler from vectorising the fill, so the setup phase of the
 * -march builds stays (mostly) free of wide instructions. */
static FERRY_UNUSED void ferry_fill(uint32_t *p, size_t n, uint32_t seed)
{
    uint32_t x = seed;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = x >> 8;
    }
}

#endif
