/* Clock and fp32 FMA throughput of this CPU, for the theoretical peak printed by `make bench`.
 *
 *   cc -O2 -pthread benchmarks/peak.c -o peak && ./peak [threads]
 *
 * A KVM guest shows only the TSC rate in /proc/cpuinfo ("cpu MHz"), not the clock the cores run
 * at. So the clock is measured: a chain of dependent integer adds retires one add per cycle on
 * every x86 core of the last 15 years, so adds / thread-CPU-second = cycles / second. Then the
 * FMA throughput is measured with many independent accumulators (AVX-512 zmm and AVX2 ymm),
 * which gives fp32 FLOP per cycle per core: 64 for two 512-bit FMA pipes (Zen 5, Intel server
 * parts with 2 FMA units), 32 when 512-bit FMAs are split in two halves (Zen 4) or for AVX2 with
 * two 256-bit pipes. Each figure is the best of many repeats of thread CPU time, so time spent
 * descheduled by other processes does not count (a busy machine lowers nothing but the odds of
 * a clean repeat). One JSON line per thread on stdout.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define ADDS_PER_ITER 100
static double clock_hz(long iters, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        unsigned long x = 0, one = 1;
        double t0 = now();
        for (long i = 0; i < iters; i++) {
            /* 100 dependent adds: each needs the previous result, 1 cycle latency each. */
            __asm__ volatile(
                ".rept 100\n\t"
                "add %1, %0\n\t"
                ".endr\n\t"
                : "+r"(x) : "r"(one));
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
        if (x != (unsigned long)iters * ADDS_PER_ITER) abort();
    }
    return (double)iters * ADDS_PER_ITER / best;
}

/* 12 independent accumulators (FMA latency 4 cycles x 2 pipes needs >= 8), written in assembly
 * so the compiler can neither spill them to memory nor fold the loop. */
#define FMA_LOOP(reg, width)                                                                   \
    __asm__ volatile(                                                                          \
        "vbroadcastss %[a], %%" reg "0\n\t"                                                    \
        "vbroadcastss %[b], %%" reg "1\n\t"                                                    \
        ".irp r,2,3,4,5,6,7,8,9,10,11,12,13\n\t"                                               \
        "vxorps %%" reg "\\r, %%" reg "\\r, %%" reg "\\r\n\t"                                  \
        ".endr\n\t"                                                                            \
        "1:\n\t"                                                                               \
        ".irp r,2,3,4,5,6,7,8,9,10,11,12,13\n\t"                                               \
        "vfmadd231ps %%" reg "0, %%" reg "1, %%" reg "\\r\n\t"                                 \
        ".endr\n\t"                                                                            \
        "dec %[n]\n\t"                                                                         \
        "jnz 1b\n\t"                                                                           \
        : [n] "+r"(n)                                                                          \
        : [a] "m"(a), [b] "m"(b)                                                               \
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",       \
          "xmm10", "xmm11", "xmm12", "xmm13", "cc")

__attribute__((target("avx512f"))) static double fma512(long iters, int reps) {
    double best = 1e30;
    float a = 1e-7f, b = 1e-7f;
    for (int r = 0; r < reps; r++) {
        long n = iters;
        double t0 = now();
        FMA_LOOP("zmm", 16);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return (double)iters * 12 * 16 * 2 / best;
}

__attribute__((target("avx2,fma"))) static double fma256(long iters, int reps) {
    double best = 1e30;
    float a = 1e-7f, b = 1e-7f;
    for (int r = 0; r < reps; r++) {
        long n = iters;
        double t0 = now();
        FMA_LOOP("ymm", 8);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return (double)iters * 12 * 8 * 2 / best;
}

typedef struct { int id; double hz, f512, f256; } job_t;

static void *run(void *p) {
    job_t *j = p;
    j->hz = clock_hz(200000, 30);           /* 2e7 adds: ~5-8 ms per repeat */
    if (__builtin_cpu_supports("avx512f")) j->f512 = fma512(400000, 30);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) j->f256 = fma256(400000, 30);
    double hz2 = clock_hz(200000, 30);      /* again after the FMAs (AVX-512 clock offsets) */
    if (hz2 > j->hz) j->hz = hz2;
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    if (n < 1 || n > 256) n = 1;
    pthread_t th[256];
    job_t jobs[256] = {{0}};
    for (int i = 0; i < n; i++) {
        jobs[i].id = i;
        pthread_create(&th[i], NULL, run, &jobs[i]);
    }
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < n; i++)
        printf("{\"thread\": %d, \"threads\": %d, \"clock_hz\": %.6g, \"fma512_flops\": %.6g, "
               "\"fma256_flops\": %.6g}\n",
               i, n, jobs[i].hz, jobs[i].f512, jobs[i].f256);
    return 0;
}
