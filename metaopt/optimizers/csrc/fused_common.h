/* Shared by the fused step kernels: a vectorisable log and log/sign preprocessing, the loop that
   splits the coordinates of all parameters across threads, and the backward kernels' summing.

   Every kernel exports
     int NAME(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
              float *const *state, const float *weights, const Options *options, int threads)
   where params[s] and grads[s] hold sizes[s] floats, state[i] are the optimizer's flat state buffers
   (over all segments, in order), and Options is the kernel's own struct of named settings (mirrored
   field by field by a ctypes.Structure beside the optimizer's Python class); and, for meta-training,
     int NAME_backward(int64_t n, const float *grad, float *const *state, float *grad_p,
                       const float *weights, const Options *options, double *grad_weights, int threads)
   with state = (p, dL/dupdate, dL/dp', the kernel's other states), which writes dL/dp and the summed
   gradients of the weights. Both return 0, or -1 for settings they do not take; a backward kernel
   returns -2 where it could not allocate its buffers. */

#ifndef METAOPT_FUSED_COMMON_H
#define METAOPT_FUSED_COMMON_H

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define ALIGN 64
#define MAX_THREADS 64 /* also the most shares a backward kernel's totals must hold */
#define MIN_COORDINATES_PER_THREAD 32768

/* Backward kernels work on blocks of LANES coordinates, a statement at a time over the block (EACH:
   one vector operation; gcc must not unroll it, or it stops vectorising). Each lane sums the weights'
   gradients in its own floats, flushed into per-share doubles every FLUSH_BLOCKS blocks. */
#define LANES 8
#define FLUSH_BLOCKS 64
#define EACH _Pragma("GCC unroll 1") for (int l = 0; l < LANES; l++)
typedef float Lanes[LANES];

typedef struct {
    float *const *state;
    const float *weights;
    const void *options; /* the kernel's own Options */
    double *totals; /* backward kernels: per-share sums of the weights' gradients, share-major */
    int sums;       /* backward kernels: how many gradients each share sums */
    void *scratch;  /* a kernel's own per-share buffers, allocated before the threads start */
} Kernel;

/* Steps coordinates [first, first + n) of the concatenation, in share `share`; grad and param point
   at the first. */
typedef void (*StepFn)(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n, int share);

typedef struct {
    const Kernel *kernel;
    StepFn step;
    int64_t segments;
    const int64_t *sizes;
    float *const *params;
    const float *const *grads;
    int64_t begin, end; /* this thread's coordinates, in the concatenation of all segments */
    int index;
} Share;

/* tanh x = x P(x²) / Q(x²) on [-TANH_LIMIT, TANH_LIMIT], within 4e-7 (Eigen's rational approximation);
   tanh is 1 - 2.7e-7 at the limit. Macros, so that floats and GCC vectors of floats share them. */
#define TANH_LIMIT 7.90531110763549805f
#define TANH_P(x2)                                                                                              \
    ((((((-2.76076847742355e-16f * (x2) + 2.00018790482477e-13f) * (x2) - 8.60467152213735e-11f) * (x2) +      \
        5.12229709037114e-08f) * (x2) + 1.48572235717979e-05f) * (x2) + 6.37261928875436e-04f) * (x2) +         \
     4.89352455891786e-03f)
#define TANH_Q(x2) \
    (((1.19825839466702e-06f * (x2) + 1.18534705686654e-04f) * (x2) + 2.26843463243900e-03f) * (x2) + 4.89352518554385e-03f)

/* Natural log of x >= 0 (Cephes logf, within 2 ulp of logf), branch-free so that it vectorises, where
   logf would be one library call per coordinate. */
static inline float log_nonnegative(float x) {
    const int subnormal = x < FLT_MIN;
    const float scaled = subnormal ? x * 8388608.0f : x; /* 2^23 */
    int32_t bits;
    memcpy(&bits, &scaled, sizeof bits);
    int32_t exponent = ((bits >> 23) & 0xff) - 126 - (subnormal ? 23 : 0);
    bits = (bits & 0x007fffff) | 0x3f000000; /* mantissa m in [0.5, 1) */
    float m;
    memcpy(&m, &bits, sizeof m);
    const int below = m < 0.707106781186547524f;
    exponent -= below;
    m = below ? m + m - 1.0f : m - 1.0f;
    const float e = (float)exponent, z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    const float result = m + y + 0.693359375f * e;
    const float finite = x > FLT_MAX ? INFINITY : result; /* one select each: nested ones stop gcc vectorising */
    return x == 0.0f ? -INFINITY : finite;
}

/* Andrychowicz et al.'s preprocessing (metaopt/optimizers/features.py) of g: (log|g| / p, sign g) where
   |g| >= e^-p, else (-1, e^p g); branch-free, so that it vectorises. */
INLINE void log_sign(const float g, const float threshold, const float p, const float e_p, float *magnitude_feature,
                     float *direction) {
    const float magnitude = fabsf(g), log_magnitude = log_nonnegative(magnitude) / p;
    const float sign = (g > 0.0f ? 1.0f : 0.0f) - (g < 0.0f ? 1.0f : 0.0f);
    const int large = magnitude >= threshold;
    *magnitude_feature = large ? log_magnitude : -1.0f;
    *direction = large ? sign : g * e_p;
}

static void *run_share(void *arg) {
    const Share *share = arg;
    int64_t offset = 0; /* first coordinate of the current segment */
    for (int64_t s = 0; s < share->segments && offset < share->end; offset += share->sizes[s], s++) {
        const int64_t lo = share->begin > offset ? share->begin : offset;
        const int64_t hi = share->end < offset + share->sizes[s] ? share->end : offset + share->sizes[s];
        if (lo < hi)
            share->step(share->kernel, share->grads[s] + (lo - offset), share->params[s] + (lo - offset), lo, hi - lo,
                        share->index);
    }
    return 0;
}

/* Runs step over every coordinate, split in contiguous shares across up to `threads` threads; returns
   the number of shares (share i takes the i-th run of coordinates, so sums over shares in index order
   are deterministic). */
static int run_threads(StepFn step, const Kernel *kernel, int64_t segments, const int64_t *sizes,
                       float *const *params, const float *const *grads, int threads) {
    int64_t total = 0;
    for (int64_t s = 0; s < segments; s++) total += sizes[s];
    const int64_t most = (total + MIN_COORDINATES_PER_THREAD - 1) / MIN_COORDINATES_PER_THREAD;
    if (threads > most) threads = (int)most;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    Share shares[MAX_THREADS];
    pthread_t workers[MAX_THREADS];
    const int64_t size = ((total + threads - 1) / threads + ALIGN - 1) / ALIGN * ALIGN;
    for (int t = 0; t < threads; t++)
        shares[t] = (Share){kernel, step, segments, sizes, params, grads, t * size,
                            (t + 1) * size < total ? (t + 1) * size : total, t};
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&workers[started], 0, run_share, &shares[started]) != 0) break;
    for (int t = started; t < threads; t++) run_share(&shares[t]); /* a thread refused: do its share here */
    run_share(&shares[0]);
    for (int t = 1; t < started; t++) pthread_join(workers[t], 0);
    return threads;
}

/* Adds a block run's per-lane sums (lanes[k * LANES + lane]) into its share's totals and clears them. */
static inline void flush_lanes(const Kernel *kernel, float *lanes, int share) {
    double *totals = kernel->totals + (int64_t)share * kernel->sums;
    for (int k = 0; k < kernel->sums * LANES; k++) totals[k / LANES] += lanes[k];
    memset(lanes, 0, sizeof(float) * kernel->sums * LANES);
}

/* Runs a backward kernel's step over the n coordinates of one segment, each share summing the
   kernel.sums weights' gradients into its totals, then adds the shares in order into grad_weights:
   the result does not depend on thread timing. Returns 0, or -2 without memory. */
static int run_backward(StepFn step, Kernel kernel, int64_t n, const float *grad, float *grad_p, double *grad_weights,
                        int threads) {
    kernel.totals = calloc((size_t)MAX_THREADS * kernel.sums, sizeof(double));
    if (!kernel.totals) return -2;
    const int shares = run_threads(step, &kernel, 1, &n, &grad_p, (const float *const *)&grad, threads);
    for (int k = 0; k < kernel.sums; k++) {
        double sum = 0.0;
        for (int t = 0; t < shares; t++) sum += kernel.totals[(int64_t)t * kernel.sums + k];
        grad_weights[k] = sum;
    }
    free(kernel.totals);
    return 0;
}

#endif
