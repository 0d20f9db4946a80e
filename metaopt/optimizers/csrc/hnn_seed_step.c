/* One fused CPU step of the hnn_seed learned optimizer (metaopt/optimizers/hnn_seed.py), float32.

   The eager update runs ~40 tensor ops, each a pass over every coordinate; this runs the whole
   per-coordinate computation in one pass: read the gradient, the parameter and the state p, write
   the parameter and p (state[0], [total, dim]).

   shape: dim, hidden, depth, activation (RELU, TANH, GELU, SILU), preprocess.
   scalars: threshold e^-p, p, e^p (the log/sign preprocessing), out_mul, lr.
   weights, packed by HNNSeed.fused_step in this order (nn.Linear weights are [out, in], row-major):
     G: per hidden layer W [hidden, in], b [hidden]; then W [dim, hidden], b [dim]
     V: the same
     D [2 dim, 2 dim]; M = L Lᵀ [dim, dim]; W_out [2 dim], b_out [1]; W1 [dim, 2 dim], b1 [dim] */

#include "fused_common.h"

#define MAX_DIM 2
#define MAX_WIDTH 64

enum { RELU = 0, TANH = 1, GELU = 2, SILU = 3 };

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
INLINE void step_coordinates(const Kernel *kernel, const float *grad, float *param, float *state, const int64_t n,
                             const int d, const int hidden, const int depth, const int activation,
                             const int preprocess) {
    const float threshold = kernel->scalars[0], log_divisor = kernel->scalars[1], small_scale = kernel->scalars[2];
    const float out_mul = kernel->scalars[3], lr = kernel->scalars[4];
    const float *G = kernel->weights;
    const int potential_size = (d + 1) * hidden + (depth - 1) * (hidden + 1) * hidden + (hidden + 1) * d;
    const float *V = G + potential_size, *D = V + potential_size, *M = D + 4 * d * d, *w_out = M + d * d,
                *b_out = w_out + 2 * d, *w1 = b_out + 1, *b1 = w1 + 2 * d * d;
    for (int64_t j = 0; j < n; j++) {
        float q[MAX_DIM], p[MAX_DIM], g_q[MAX_DIM], v[MAX_DIM], q_dot[MAX_DIM], force[MAX_DIM], p_dot[MAX_DIM];
        if (preprocess) { /* (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g); branch-free */
            const float g = grad[j], magnitude = fabsf(g);
            const int large = magnitude >= threshold;
            const float log_magnitude = log_nonnegative(magnitude) / log_divisor;
            const float sign = (g > 0.0f ? 1.0f : 0.0f) - (g < 0.0f ? 1.0f : 0.0f);
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

static void step_segment(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n,
                         int share) {
    const int *shape = kernel->shape; /* dim, hidden, depth, activation, preprocess */
    float *state = kernel->state[0] + first * shape[0];
    if (shape[0] == 2 && shape[1] == 2 && shape[2] == 1 && shape[3] == RELU && shape[4])
        step_coordinates(kernel, grad, param, state, n, 2, 2, 1, RELU, 1);
    else if (shape[0] == 1 && shape[1] == 1 && shape[2] == 1 && shape[3] == RELU && !shape[4])
        step_coordinates(kernel, grad, param, state, n, 1, 1, 1, RELU, 0);
    else
        step_coordinates(kernel, grad, param, state, n, shape[0], shape[1], shape[2], shape[3], shape[4]);
}

int hnn_seed_step(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
                  float *const *state, const float *weights, const int *shape, const float *scalars, int threads) {
    if (shape[0] < 1 || shape[0] > MAX_DIM || shape[1] < 1 || shape[1] > MAX_WIDTH || shape[2] < 1) return -1;
    const Kernel kernel = {state, weights, shape, scalars, 0};
    run_threads(step_segment, &kernel, segments, sizes, params, grads, threads);
    return 0;
}
