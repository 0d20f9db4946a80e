/* One fused CPU step of the hnn_seed learned optimizer (metaopt/optimizers/hnn_seed.py), float32.

   The eager update runs ~40 tensor ops, each a pass over every coordinate; this runs the whole
   per-coordinate computation in one pass: read the gradient, the parameter and the state p, write
   the parameter and p (state[0], [total, dim]).

   options: Options below. weights: packed by HNNSeed.fused_weights in weight_layout's order. */

#include "fused_common.h"

#define MAX_DIM 2
#define MAX_WIDTH 64

enum { RELU = 0, TANH = 1, GELU = 2, SILU = 3 };

/* The settings, by name; HNNSeedKernelOptions (metaopt/optimizers/hnn_seed.py) mirrors it field by field. */
typedef struct {
    int dim, hidden, depth, activation, preprocess;
    float threshold, log_divisor, small_scale; /* the log/sign preprocessing: e^-p, p, e^p */
    float out_mul, lr;
} Options;

/* Where each weight starts (nn.Linear weights are [out, in], row-major):
     G: per hidden layer W [hidden, in], b [hidden]; then W [dim, hidden], b [dim]
     V: the same
     D [2 dim, 2 dim]; M = L Lᵀ [dim, dim]; W_out [2 dim], b_out [1]; W1 [dim, 2 dim], b1 [dim] */
typedef struct {
    int G, V, D, M, w_out, b_out, w1, b1, total;
} Layout;

INLINE Layout weight_layout(const int d, const int hidden, const int depth) {
    Layout o;
    const int potential = (d + 1) * hidden + (depth - 1) * (hidden + 1) * hidden + (hidden + 1) * d;
    o.G = 0, o.V = potential, o.D = 2 * potential, o.M = o.D + 4 * d * d, o.w_out = o.M + d * d;
    o.b_out = o.w_out + 2 * d, o.w1 = o.b_out + 1, o.b1 = o.w1 + 2 * d * d, o.total = o.b1 + d;
    return o;
}

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
    const Options *o = kernel->options;
    const float threshold = o->threshold, log_divisor = o->log_divisor, small_scale = o->small_scale;
    const float out_mul = o->out_mul, lr = o->lr;
    const Layout L = weight_layout(d, hidden, depth);
    const float *w = kernel->weights;
    const float *G = w + L.G, *V = w + L.V, *D = w + L.D, *M = w + L.M, *w_out = w + L.w_out, *b_out = w + L.b_out,
                *w1 = w + L.w1, *b1 = w + L.b1;
    for (int64_t j = 0; j < n; j++) {
        float q[MAX_DIM], p[MAX_DIM], g_q[MAX_DIM], v[MAX_DIM], q_dot[MAX_DIM], force[MAX_DIM], p_dot[MAX_DIM];
        if (preprocess) {
            log_sign(grad[j], threshold, log_divisor, small_scale, &q[0], &q[1]);
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
    const Options *o = kernel->options;
    float *state = kernel->state[0] + first * o->dim;
    if (o->dim == 2 && o->hidden == 2 && o->depth == 1 && o->activation == RELU && o->preprocess)
        step_coordinates(kernel, grad, param, state, n, 2, 2, 1, RELU, 1);
    else if (o->dim == 1 && o->hidden == 1 && o->depth == 1 && o->activation == RELU && !o->preprocess)
        step_coordinates(kernel, grad, param, state, n, 1, 1, 1, RELU, 0);
    else
        step_coordinates(kernel, grad, param, state, n, o->dim, o->hidden, o->depth, o->activation, o->preprocess);
}

int hnn_seed_step(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
                  float *const *state, const float *weights, const Options *options, int threads) {
    const Options *o = options;
    if (o->dim < 1 || o->dim > MAX_DIM || o->hidden < 1 || o->hidden > MAX_WIDTH || o->depth < 1) return -1;
    const Kernel kernel = {state, weights, options, 0, 0};
    run_threads(step_segment, &kernel, segments, sizes, params, grads, threads);
    return 0;
}

/* ---- Backward, for meta-training: the gradients of one step w.r.t. p and every weight. ----

   First order (g, so q, is a constant); depth 1 and ReLU or tanh only.
   state: p [total, dim], dL/dupdate [total], dL/dp' [total, dim]; writes dL/dp ([total, dim]) into
   grad_p. The weights' gradients come in the weights' layout, with dL/dM in M's place; they are
   summed per lane, flushed into per-share doubles and added share by share in order (deterministic),
   as in phnn_step.c. */

#define MAX_WEIGHTS (2 * (MAX_DIM * MAX_WIDTH + MAX_WIDTH + MAX_WIDTH * MAX_DIM + MAX_DIM) + 4 * MAX_DIM * MAX_DIM + \
                     MAX_DIM * MAX_DIM + 2 * MAX_DIM + 1 + 2 * MAX_DIM * MAX_DIM + MAX_DIM)

/* One potential (G or V) forward for a block, keeping its pre-activations and activations. */
INLINE void potential_forward(const float *w, const Lanes *q, Lanes *z, Lanes *a, Lanes *out, const int d,
                              const int hidden, const int activation) {
    const float *b1 = w + d * hidden, *w2 = b1 + hidden, *b2 = w2 + hidden * d;
    for (int j = 0; j < hidden; j++) {
        EACH z[j][l] = b1[j];
        for (int c = 0; c < d; c++) {
            const float weight = w[j * d + c];
            EACH z[j][l] += weight * q[c][l];
        }
        if (activation == RELU)
            EACH a[j][l] = z[j][l] > 0.0f ? z[j][l] : 0.0f;
        else
            EACH a[j][l] = tanhf(z[j][l]);
    }
    for (int k = 0; k < d; k++) {
        EACH out[k][l] = b2[k];
        for (int j = 0; j < hidden; j++) {
            const float weight = w2[k * hidden + j];
            EACH out[k][l] += weight * a[j][l];
        }
    }
}

/* Its backward from dL/dout: adds the weights' gradients to acc (same layout, per lane). */
INLINE void potential_backward(const float *w, float *acc, const Lanes *q, const Lanes *z, const Lanes *a,
                               const Lanes *bar_out, const int d, const int hidden, const int activation) {
    const int b1 = d * hidden, w2 = b1 + hidden, b2 = w2 + hidden * d;
    for (int k = 0; k < d; k++) EACH acc[(b2 + k) * LANES + l] += bar_out[k][l];
    for (int j = 0; j < hidden; j++) {
        Lanes bar_z;
        EACH bar_z[l] = 0.0f;
        for (int k = 0; k < d; k++) {
            const float weight = w[w2 + k * hidden + j];
            EACH acc[(w2 + k * hidden + j) * LANES + l] += bar_out[k][l] * a[j][l], bar_z[l] += bar_out[k][l] * weight;
        }
        if (activation == RELU)
            EACH bar_z[l] = z[j][l] > 0.0f ? bar_z[l] : 0.0f;
        else
            EACH bar_z[l] *= 1.0f - a[j][l] * a[j][l];
        EACH acc[(b1 + j) * LANES + l] += bar_z[l];
        for (int c = 0; c < d; c++) EACH acc[(j * d + c) * LANES + l] += bar_z[l] * q[c][l];
    }
}

INLINE void backward_block(const Kernel *kernel, const float *grad, const float *p_in, const float *grad_update,
                           const float *grad_p_next, float *grad_p, float *acc, const int d, const int hidden,
                           const int activation, const int preprocess) {
    const Options *o = kernel->options;
    const float threshold = o->threshold, log_divisor = o->log_divisor, small_scale = o->small_scale;
    const float out_mul = o->out_mul;
    const float *w = kernel->weights;
    const Layout L = weight_layout(d, hidden, 1);
    const int G = L.G, V = L.V, D = L.D, M = L.M, w_out = L.w_out, b_out = L.b_out, w1 = L.w1, b1 = L.b1;
    Lanes q[MAX_DIM], p[MAX_DIM], g_q[MAX_DIM], v[MAX_DIM], d_q[MAX_DIM], d_p[MAX_DIM], q_dot[MAX_DIM],
        force[MAX_DIM], p_dot[MAX_DIM];
    Lanes z_g[MAX_WIDTH], a_g[MAX_WIDTH], z_v[MAX_WIDTH], a_v[MAX_WIDTH];
    if (preprocess) {
        EACH log_sign(grad[l], threshold, log_divisor, small_scale, &q[0][l], &q[1][l]);
    } else {
        EACH q[0][l] = grad[l];
    }
    for (int k = 0; k < d; k++) EACH p[k][l] = p_in[l * d + k];
    potential_forward(w + G, q, z_g, a_g, g_q, d, hidden, activation);
    potential_forward(w + V, q, z_v, a_v, v, d, hidden, activation);
    for (int k = 0; k < d; k++) {
        EACH d_q[k][l] = 0.0f, d_p[k][l] = 0.0f;
        for (int c = 0; c < d; c++) {
            const float dqv = w[D + k * 2 * d + c], dqp = w[D + k * 2 * d + d + c],
                        dpv = w[D + (d + k) * 2 * d + c], dpp = w[D + (d + k) * 2 * d + d + c];
            EACH d_q[k][l] += dqv * v[c][l] + dqp * p[c][l], d_p[k][l] += dpv * v[c][l] + dpp * p[c][l];
        }
        EACH q_dot[k][l] = p[k][l] - d_q[k][l], force[k][l] = -v[k][l] - d_p[k][l] + g_q[k][l];
    }
    for (int k = 0; k < d; k++) {
        EACH p_dot[k][l] = 0.0f;
        for (int c = 0; c < d; c++) {
            const float m = w[M + c * d + k];
            EACH p_dot[k][l] += force[c][l] * m;
        }
    }

    /* update = out_mul (W_out [q̇, q] + b_out); p' = W1 [q̇, ṗ] + b1 */
    Lanes bar_raw, bar_q_dot[MAX_DIM], bar_p_dot[MAX_DIM], bar_force[MAX_DIM], bar_v[MAX_DIM], bar_p[MAX_DIM];
    EACH bar_raw[l] = out_mul * grad_update[l];
    EACH acc[b_out * LANES + l] += bar_raw[l];
    for (int c = 0; c < d; c++) {
        const float wq = w[w_out + c];
        EACH acc[(w_out + c) * LANES + l] += bar_raw[l] * q_dot[c][l];
        EACH acc[(w_out + d + c) * LANES + l] += bar_raw[l] * q[c][l];
        EACH bar_q_dot[c][l] = bar_raw[l] * wq, bar_p_dot[c][l] = 0.0f;
    }
    for (int k = 0; k < d; k++) {
        EACH acc[(b1 + k) * LANES + l] += grad_p_next[l * d + k];
        for (int c = 0; c < d; c++) {
            const float wq = w[w1 + k * 2 * d + c], wp = w[w1 + k * 2 * d + d + c];
            EACH {
                const float bar = grad_p_next[l * d + k];
                acc[(w1 + k * 2 * d + c) * LANES + l] += bar * q_dot[c][l];
                acc[(w1 + k * 2 * d + d + c) * LANES + l] += bar * p_dot[c][l];
                bar_q_dot[c][l] += bar * wq, bar_p_dot[c][l] += bar * wp;
            }
        }
    }
    for (int c = 0; c < d; c++) { /* ṗ_k = Σ_c force_c M_ck */
        EACH bar_force[c][l] = 0.0f;
        for (int k = 0; k < d; k++) {
            const float m = w[M + c * d + k];
            EACH acc[(M + c * d + k) * LANES + l] += force[c][l] * bar_p_dot[k][l], bar_force[c][l] += bar_p_dot[k][l] * m;
        }
    }
    /* force = −v − D_p + G(q), q̇ = p − D_q, [D_q, D_p] = D [v, p] */
    for (int c = 0; c < d; c++) EACH bar_v[c][l] = -bar_force[c][l], bar_p[c][l] = bar_q_dot[c][l];
    for (int k = 0; k < d; k++) {
        for (int c = 0; c < d; c++) {
            const float dqv = w[D + k * 2 * d + c], dqp = w[D + k * 2 * d + d + c],
                        dpv = w[D + (d + k) * 2 * d + c], dpp = w[D + (d + k) * 2 * d + d + c];
            EACH {
                const float bar_dq = -bar_q_dot[k][l], bar_dp = -bar_force[k][l];
                acc[(D + k * 2 * d + c) * LANES + l] += bar_dq * v[c][l];
                acc[(D + k * 2 * d + d + c) * LANES + l] += bar_dq * p[c][l];
                acc[(D + (d + k) * 2 * d + c) * LANES + l] += bar_dp * v[c][l];
                acc[(D + (d + k) * 2 * d + d + c) * LANES + l] += bar_dp * p[c][l];
                bar_v[c][l] += bar_dq * dqv + bar_dp * dpv, bar_p[c][l] += bar_dq * dqp + bar_dp * dpp;
            }
        }
    }
    potential_backward(w + G, acc + G * LANES, q, z_g, a_g, bar_force, d, hidden, activation);
    potential_backward(w + V, acc + V * LANES, q, z_v, a_v, bar_v, d, hidden, activation);
    for (int k = 0; k < d; k++) EACH grad_p[l * d + k] = bar_p[k][l];
}

INLINE void backward_run(const Kernel *kernel, const float *grad, int64_t first, int64_t n, int share, const int d,
                         const int hidden, const int activation, const int preprocess) {
    const float *p = kernel->state[0] + first * d, *grad_update = kernel->state[1] + first,
                *grad_p_next = kernel->state[2] + first * d;
    float *grad_p = kernel->state[3] + first * d;
    float lanes[MAX_WEIGHTS * LANES];
    memset(lanes, 0, sizeof(float) * kernel->sums * LANES);
    for (int64_t i = 0, blocks = 1; i < n; i += LANES, blocks++) {
        if (i + LANES <= n) {
            backward_block(kernel, grad + i, p + i * d, grad_update + i, grad_p_next + i * d, grad_p + i * d, lanes, d,
                           hidden, activation, preprocess);
        } else { /* the last, partial block: padded with zeros and no upstream gradient */
            float tail_grad[LANES] = {0}, tail_p[LANES * MAX_DIM] = {0}, tail_update[LANES] = {0},
                  tail_p_next[LANES * MAX_DIM] = {0}, tail_grad_p[LANES * MAX_DIM];
            memcpy(tail_grad, grad + i, sizeof(float) * (n - i));
            memcpy(tail_p, p + i * d, sizeof(float) * (n - i) * d);
            memcpy(tail_update, grad_update + i, sizeof(float) * (n - i));
            memcpy(tail_p_next, grad_p_next + i * d, sizeof(float) * (n - i) * d);
            backward_block(kernel, tail_grad, tail_p, tail_update, tail_p_next, tail_grad_p, lanes, d, hidden,
                           activation, preprocess);
            memcpy(grad_p + i * d, tail_grad_p, sizeof(float) * (n - i) * d);
        }
        if (blocks % FLUSH_BLOCKS == 0 || i + LANES >= n) flush_lanes(kernel, lanes, share);
    }
}

/* grad_p is found through kernel->state[3]: it holds dim floats per coordinate, not one. */
static void backward_segment(const Kernel *kernel, const float *grad, float *unused, int64_t first, int64_t n,
                             int share) {
    (void)unused;
    const Options *o = kernel->options;
    if (o->dim == 2 && o->hidden == 2 && o->activation == RELU && o->preprocess)
        backward_run(kernel, grad, first, n, share, 2, 2, RELU, 1);
    else
        backward_run(kernel, grad, first, n, share, o->dim, o->hidden, o->activation, o->preprocess);
}

int hnn_seed_step_backward(int64_t n, const float *grad, float *const *state, float *grad_p, const float *weights,
                           const Options *options, double *grad_weights, int threads) {
    const Options *o = options;
    if (o->dim < 1 || o->dim > MAX_DIM || o->hidden < 1 || o->hidden > MAX_WIDTH || o->depth != 1 ||
        (o->activation != RELU && o->activation != TANH))
        return -1;
    const int sums = weight_layout(o->dim, o->hidden, 1).total;
    float *const buffers[4] = {state[0], state[1], state[2], grad_p};
    const Kernel kernel = {buffers, weights, options, 0, sums};
    return run_backward(backward_segment, kernel, n, grad, grad_p, grad_weights, threads);
}
