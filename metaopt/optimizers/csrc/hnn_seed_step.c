/* One fused CPU step of the hnn_seed learned optimizer (metaopt/optimizers/hnn_seed.py), float32.

   The eager update runs ~40 tensor ops, each a pass over every coordinate; this runs the whole
   per-coordinate computation in one pass: read the gradient, the parameter and the state p, write
   the parameter and p. The coordinates are split across threads in runs of ALIGN.

   weights, packed by HNNSeed.fused_step in this order (nn.Linear weights are [out, in], row-major):
     G: per hidden layer W [hidden, in], b [hidden]; then W [dim, hidden], b [dim]
     V: the same
     D [2 dim, 2 dim]; M = L Lᵀ [dim, dim]; W_out [2 dim], b_out [1]; W1 [dim, 2 dim], b1 [dim]
   Returns 0, or -1 for a shape the kernel does not support (dim > 2 or hidden > MAX_WIDTH). */

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define ALIGN 64
#define MAX_DIM 2
#define MAX_WIDTH 64
#define MIN_COORDINATES_PER_THREAD 32768

enum { RELU = 0, TANH = 1, GELU = 2, SILU = 3 };

typedef struct {
    int64_t segments;
    const int64_t *sizes;
    float *const *params;
    const float *const *grads;
    float *state;
    const float *weights;
    int dim, hidden, depth, activation, preprocess;
    float threshold, log_divisor, small_scale, out_mul, lr;
    int64_t begin, end; /* this thread's coordinates, in the concatenation of all segments */
} Job;

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
    return x == 0.0f ? -INFINITY : x > FLT_MAX ? INFINITY : result;
}

#define INLINE static inline __attribute__((always_inline))

INLINE float activate(const int activation, float x) {
    switch (activation) {
    case RELU: return x < 0.0f ? 0.0f : x; /* keeps NaN, like torch.relu */
    case TANH: return tanhf(x);
    case GELU: return 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2));
    default: return x / (1.0f + expf(-x));
    }
}

/* y = W x + b (in inputs, out outputs); returns the weights after W and b. */
INLINE const float *dense(const float *w, const int in, const int out, const float *x, float *y) {
    const float *bias = w + in * out;
    for (int o = 0; o < out; o++) {
        float sum = bias[o];
        for (int k = 0; k < in; k++) sum += w[o * in + k] * x[k];
        y[o] = sum;
    }
    return bias + out;
}

/* G or V: Linear(d, hidden)-act-...-Linear(hidden, d); returns the weights after it. */
INLINE const float *potential(const float *w, const float *q, float *out, const int d, const int hidden,
                              const int depth, const int activation) {
    float h[2][MAX_WIDTH];
    const float *x = q;
    for (int layer = 0, width = d; layer < depth; layer++, width = hidden) {
        w = dense(w, width, hidden, x, h[layer % 2]);
        for (int o = 0; o < hidden; o++) h[layer % 2][o] = activate(activation, h[layer % 2][o]);
        x = h[layer % 2];
    }
    return dense(w, hidden, d, x, out);
}

/* The step of n consecutive coordinates, written per coordinate. Inlined with constant shapes for the
   default networks, so the loops over features and layers unroll, the weights stay in registers and
   the loop over coordinates vectorises; a runtime-shaped copy serves every other network. */
INLINE void step_coordinates(const Job *job, const float *grad, float *param, float *state, const int64_t n,
                             const int d, const int hidden, const int depth, const int activation,
                             const int preprocess) {
    const float threshold = job->threshold, log_divisor = job->log_divisor, small_scale = job->small_scale;
    const float out_mul = job->out_mul, lr = job->lr;
    const float *G = job->weights;
    const int potential_size = (d + 1) * hidden + (depth - 1) * (hidden + 1) * hidden + (hidden + 1) * d;
    const float *V = G + potential_size, *D = V + potential_size, *M = D + 4 * d * d, *w_out = M + d * d,
                *b_out = w_out + 2 * d, *w1 = b_out + 1, *b1 = w1 + 2 * d * d;
    for (int64_t j = 0; j < n; j++) {
        float q[MAX_DIM], p[MAX_DIM], g_q[MAX_DIM], v[MAX_DIM], q_dot[MAX_DIM], force[MAX_DIM], p_dot[MAX_DIM];
        if (preprocess) { /* (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g); branch-free */
            const float g = grad[j], magnitude = fabsf(g);
            const int large = magnitude >= threshold;
            const float log_magnitude = log_nonnegative(magnitude) / log_divisor;
            const float sign = g > 0.0f ? 1.0f : g < 0.0f ? -1.0f : 0.0f;
            q[0] = large ? log_magnitude : -1.0f;
            q[1] = large ? sign : g * small_scale;
        } else {
            q[0] = grad[j];
        }
        for (int k = 0; k < d; k++) p[k] = state[j * d + k];
        potential(G, q, g_q, d, hidden, depth, activation);
        potential(V, q, v, d, hidden, depth, activation);
        for (int k = 0; k < d; k++) { /* [D_q, D_p] = D [V(q), p]; q̇ = p − D_q; force = −V(q) − D_p + G(q) */
            float d_q = 0.0f, d_p = 0.0f;
            for (int c = 0; c < d; c++) {
                d_q += D[k * 2 * d + c] * v[c] + D[k * 2 * d + d + c] * p[c];
                d_p += D[(d + k) * 2 * d + c] * v[c] + D[(d + k) * 2 * d + d + c] * p[c];
            }
            q_dot[k] = p[k] - d_q;
            force[k] = -v[k] - d_p + g_q[k];
        }
        for (int k = 0; k < d; k++) { /* ṗ = force · M */
            p_dot[k] = 0.0f;
            for (int c = 0; c < d; c++) p_dot[k] += force[c] * M[c * d + k];
        }
        float raw = b_out[0]; /* update = out_mul · W_out [q̇, q]; θ += lr · update */
        for (int c = 0; c < d; c++) raw += w_out[c] * q_dot[c] + w_out[d + c] * q[c];
        param[j] += lr * (out_mul * raw);
        for (int k = 0; k < d; k++) { /* next p = W1 [q̇, ṗ] + b1 */
            float next = b1[k];
            for (int c = 0; c < d; c++) next += w1[k * 2 * d + c] * q_dot[c] + w1[k * 2 * d + d + c] * p_dot[c];
            state[j * d + k] = next;
        }
    }
}

static void step_segment(const Job *job, const float *grad, float *param, float *state, int64_t n) {
    if (job->dim == 2 && job->hidden == 2 && job->depth == 1 && job->activation == RELU && job->preprocess)
        step_coordinates(job, grad, param, state, n, 2, 2, 1, RELU, 1);
    else if (job->dim == 1 && job->hidden == 1 && job->depth == 1 && job->activation == RELU && !job->preprocess)
        step_coordinates(job, grad, param, state, n, 1, 1, 1, RELU, 0);
    else
        step_coordinates(job, grad, param, state, n, job->dim, job->hidden, job->depth, job->activation,
                         job->preprocess);
}

static void *run_job(void *arg) {
    const Job *job = arg;
    int64_t offset = 0; /* first coordinate of the current segment */
    for (int64_t s = 0; s < job->segments && offset < job->end; offset += job->sizes[s], s++) {
        const int64_t lo = job->begin > offset ? job->begin : offset;
        const int64_t hi = job->end < offset + job->sizes[s] ? job->end : offset + job->sizes[s];
        if (lo < hi)
            step_segment(job, job->grads[s] + (lo - offset), job->params[s] + (lo - offset),
                         job->state + lo * job->dim, hi - lo);
    }
    return 0;
}

int hnn_seed_step(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
                  float *state, const float *weights, int dim, int hidden, int depth, int activation,
                  int preprocess, float threshold, float log_divisor, float small_scale, float out_mul, float lr,
                  int threads) {
    if (dim < 1 || dim > MAX_DIM || hidden < 1 || hidden > MAX_WIDTH || depth < 1) return -1;
    int64_t total = 0;
    for (int64_t s = 0; s < segments; s++) total += sizes[s];
    int64_t most = (total + MIN_COORDINATES_PER_THREAD - 1) / MIN_COORDINATES_PER_THREAD;
    if (threads > most) threads = (int)most;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;

    Job jobs[64];
    pthread_t workers[64];
    const int64_t share = ((total + threads - 1) / threads + ALIGN - 1) / ALIGN * ALIGN;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (Job){segments, sizes, params, grads, state, weights, dim, hidden, depth, activation, preprocess,
                        threshold, log_divisor, small_scale, out_mul, lr, t * share,
                        (t + 1) * share < total ? (t + 1) * share : total};
    }
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&workers[started], 0, run_job, &jobs[started]) != 0) break;
    for (int t = started; t < threads; t++) run_job(&jobs[t]); /* a thread refused: do its share here */
    run_job(&jobs[0]);
    for (int t = 1; t < started; t++) pthread_join(workers[t], 0);
    return 0;
}
