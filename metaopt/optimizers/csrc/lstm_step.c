/* One fused CPU step of the coordinatewise LSTM optimizer (metaopt/optimizers/lstm.py), float32, and its
   backward for first-order meta-training. Per coordinate:

     x = log/sign features of g (input size 2), or g (input size 1)
     for each layer: (i, f, u, o) = W [x, h] + b (the gates, in torch.nn.LSTMCell's order)
                     c' = σ(f) c + σ(i) tanh(u),  h' = σ(o) tanh(c'),  x = h'
     update = out_mul (w · h'_top + b),  θ += lr · update

   The batched update streams [coordinates, 4 hidden] gate tensors through memory some twenty times a
   layer; this reads g, θ and the state once and writes θ and the state once. It is written over blocks
   of 8 coordinates with GCC vector extensions (V8: one lane per coordinate), so that every statement
   is one vector operation and the weights are scalars broadcast across the lanes.

   state: hc [total, layers, 2, hidden] (h, then c, of each layer).
   options: Options below. weights: packed by CoordinatewiseLSTM.fused_weights in weights_at's order. */

#include "fused_common.h"

/* The settings, by name; LSTMKernelOptions (metaopt/optimizers/lstm.py) mirrors it field by field. */
typedef struct {
    int in_size, hidden, layers;               /* in_size: 2 with the log/sign preprocessing, else 1 */
    float threshold, log_divisor, small_scale; /* the preprocessing: e^-p, p, e^p */
    float out_mul, lr;
} Options;

/* Where layer `layer`'s weights start: per layer W [4 hidden, in + hidden] (weight_ih and weight_hh side
   by side), then b [4 hidden] (bias_ih + bias_hh); at layer = layers, the read-out w [hidden], b [1]. */
INLINE int weights_at(const int in_size, const int hidden, const int layer) {
    return layer == 0 ? 0 : 4 * hidden * (in_size + hidden + 1) + (layer - 1) * 4 * hidden * (2 * hidden + 1);
}

#define MAX_HIDDEN 64
#define MAX_LAYERS 4
#define MAX_IN (2 * MAX_HIDDEN)
#define CHUNK_BLOCKS 16 /* backward: blocks whose weight gradients are summed in one pass */
#define FLUSH_CHUNKS 8  /* backward: chunks summed per lane between flushes (1,024 coordinates) */

typedef float V8 __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t V8i __attribute__((vector_size(LANES * sizeof(int32_t))));

INLINE V8 splat(const float x) { return (V8){0} + x; }

INLINE V8 blend(const V8i mask, const V8 a, const V8 b) { return (V8)((mask & (V8i)a) | (~mask & (V8i)b)); }

/* tanh (fused_common.h's rational approximation). σ(x) = (1 + tanh(x / 2)) / 2. */
INLINE V8 tanh8(V8 x) {
    const V8 limit = splat(TANH_LIMIT);
    x = blend(x < -limit, -limit, x);
    x = blend(x > limit, limit, x);
    const V8 x2 = x * x;
    return x * TANH_P(x2) / TANH_Q(x2);
}

INLINE V8 sigmoid8(const V8 x) { return 0.5f + 0.5f * tanh8(0.5f * x); }

/* One layer of a block: its inputs [x, h], activated gates (σ(i), σ(f), tanh(u), σ(o)), c and tanh(c'). */
typedef struct {
    V8 in[MAX_IN];
    V8 gate[4 * MAX_HIDDEN];
    V8 c[MAX_HIDDEN], tanh_c[MAX_HIDDEN];
} Layer;

typedef struct {
    Layer layer[MAX_LAYERS]; /* the first layer's inputs start with the features of g */
    V8 top[MAX_HIDDEN]; /* h' of the last layer */
} Tape;

/* gates r .. r + count - 1 = W in + b (count <= 8, a constant where inlined). */
INLINE void gate_rows(const float *W, const float *b, const int k_size, const int r, const int count, Layer *t) {
    V8 a[8];
#pragma GCC unroll 8
    for (int u = 0; u < count; u++) a[u] = splat(b[r + u]);
    for (int k = 0; k < k_size; k++) {
        const V8 x = t->in[k];
#pragma GCC unroll 8
        for (int u = 0; u < count; u++) a[u] += W[(r + u) * k_size + k] * x;
    }
#pragma GCC unroll 8
    for (int u = 0; u < count; u++) t->gate[r + u] = a[u];
}

/* gates = W in + b, eight rows at a time (four for the rest): that many independent sums keep the
   multiply-add units busy, and each input is loaded once for all of them. */
INLINE void gates_forward(const float *W, const float *b, const int k_size, const int rows, Layer *t) {
    int r = 0;
    for (; r + 8 <= rows; r += 8) gate_rows(W, b, k_size, r, 8, t);
    for (; r < rows; r += 4) gate_rows(W, b, k_size, r, 4, t);
}

/* bar_in[k .. k + count - 1] = Σ_r W[r][·] bar_gate[r] (count <= 8, a constant where inlined). */
INLINE void input_columns(const float *W, const V8 *bar_gate, const int k, const int count, const int k_size,
                          const int rows, V8 *bar_in) {
    V8 a[8] = {{0}};
    for (int r = 0; r < rows; r++) {
        const V8 bg = bar_gate[r * CHUNK_BLOCKS];
#pragma GCC unroll 8
        for (int u = 0; u < count; u++) a[u] += W[r * k_size + k + u] * bg;
    }
#pragma GCC unroll 8
    for (int u = 0; u < count; u++) bar_in[k + u] = a[u];
}

/* bar_in[k] = Σ_r W[r][k] bar_gate[r] for k in [first, k_size), eight inputs at a time. */
INLINE void inputs_backward(const float *W, const V8 *bar_gate, const int first, const int k_size, const int rows,
                            V8 *bar_in) {
    int k = first;
    for (; k + 8 <= k_size; k += 8) input_columns(W, bar_gate, k, 8, k_size, rows, bar_in);
    if (k < k_size) input_columns(W, bar_gate, k, k_size - k, k_size, rows, bar_in);
}

/* The forward of a block: reads g (8 floats) and hc (8 coordinates, `stride` floats apart), fills the
   tape, and returns the update before out_mul; h' and c' go into next (same layout as hc). */
INLINE V8 forward_block(const Kernel *kernel, const float *g, const float *hc, float *next, const int stride,
                        Tape *t, const int in_size, const int hidden, const int layers) {
    const Options *options = kernel->options;
    const float threshold = options->threshold, log_divisor = options->log_divisor,
                small_scale = options->small_scale;
    Lanes f0, f1;
    for (int l = 0; l < LANES; l++) {
        if (in_size == 2)
            log_sign(g[l], threshold, log_divisor, small_scale, &f0[l], &f1[l]);
        else
            f0[l] = g[l];
    }
    memcpy(&t->layer[0].in[0], f0, sizeof f0);
    if (in_size == 2) memcpy(&t->layer[0].in[1], f1, sizeof f1);
    int x_size = in_size;
    for (int layer = 0; layer < layers; layer++) {
        Layer *lt = &t->layer[layer];
        const int k_size = x_size + hidden, offset = layer * 2 * hidden;
        const float *w = kernel->weights + weights_at(in_size, hidden, layer);
        for (int k = 0; k < hidden; k++)
            for (int l = 0; l < LANES; l++)
                lt->in[x_size + k][l] = hc[l * stride + offset + k], lt->c[k][l] = hc[l * stride + offset + hidden + k];
        gates_forward(w, w + 4 * hidden * k_size, k_size, 4 * hidden, lt);
        V8 *h_next = layer + 1 < layers ? t->layer[layer + 1].in : t->top;
        for (int j = 0; j < hidden; j++) {
            const V8 i = sigmoid8(lt->gate[j]), f = sigmoid8(lt->gate[hidden + j]),
                     cell = tanh8(lt->gate[2 * hidden + j]), o = sigmoid8(lt->gate[3 * hidden + j]);
            lt->gate[j] = i, lt->gate[hidden + j] = f, lt->gate[2 * hidden + j] = cell, lt->gate[3 * hidden + j] = o;
            const V8 c = f * lt->c[j] + i * cell, tanh_c = tanh8(c);
            lt->tanh_c[j] = tanh_c;
            h_next[j] = o * tanh_c;
            if (next)
                for (int l = 0; l < LANES; l++)
                    next[l * stride + offset + j] = h_next[j][l], next[l * stride + offset + hidden + j] = c[l];
        }
        x_size = hidden;
    }
    const float *w = kernel->weights + weights_at(in_size, hidden, layers);
    V8 out = splat(w[hidden]);
    for (int j = 0; j < hidden; j++) out += w[j] * t->top[j];
    return out;
}

/* The steps of n consecutive coordinates: state and parameters updated in place. */
INLINE void step_coordinates(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n,
                             const int in_size, const int hidden, const int layers) {
    const Options *o = kernel->options;
    const float out_mul = o->out_mul, lr = o->lr;
    const int stride = 2 * hidden * layers;
    float *hc = kernel->state[0] + first * stride;
    Tape tape;
    for (int64_t i = 0; i < n; i += LANES) {
        if (i + LANES <= n) {
            const V8 out = forward_block(kernel, grad + i, hc + i * stride, hc + i * stride, stride, &tape, in_size,
                                         hidden, layers);
            for (int l = 0; l < LANES; l++) param[i + l] += lr * (out_mul * out[l]);
        } else { /* the last, partial block, padded with zeros */
            float tail_grad[LANES] = {0}, tail_hc[LANES * 2 * MAX_HIDDEN * MAX_LAYERS] = {0};
            memcpy(tail_grad, grad + i, sizeof(float) * (n - i));
            memcpy(tail_hc, hc + i * stride, sizeof(float) * (n - i) * stride);
            const V8 out = forward_block(kernel, tail_grad, tail_hc, tail_hc, stride, &tape, in_size, hidden, layers);
            memcpy(hc + i * stride, tail_hc, sizeof(float) * (n - i) * stride);
            for (int64_t l = 0; l < n - i; l++) param[i + l] += lr * (out_mul * out[l]);
        }
    }
}

static void step_segment(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n,
                         int share) {
    (void)share;
    const Options *o = kernel->options;
    if (o->in_size == 2 && o->hidden == 20 && o->layers == 2) /* the default (Andrychowicz et al.'s) */
        step_coordinates(kernel, grad, param, first, n, 2, 20, 2);
    else
        step_coordinates(kernel, grad, param, first, n, o->in_size, o->hidden, o->layers);
}

static int options_taken(const Options *o) {
    return (o->in_size == 1 || o->in_size == 2) && o->hidden >= 1 && o->hidden <= MAX_HIDDEN && o->layers >= 1 &&
           o->layers <= MAX_LAYERS;
}

int lstm_step(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
              float *const *state, const float *weights, const Options *options, int threads) {
    if (!options_taken(options)) return -1;
    const Kernel kernel = {state, weights, options, 0, 0};
    run_threads(step_segment, &kernel, segments, sizes, params, grads, threads);
    return 0;
}

/* ---- Backward, for meta-training: the gradients of one step w.r.t. hc and every weight. ----

   First order (g is a constant). state: hc [total, stride], dL/dupdate [total], dL/dhc' [total, stride];
   writes dL/dhc into grad_hc (state[3]). Each block's gate gradients and layer inputs go into a chunk
   buffer; every CHUNK_BLOCKS blocks the weight gradients W̄ += Σ ḡate inᵀ are summed over the chunk
   (per lane), then flushed into per-share doubles and added share by share in order (deterministic). */

typedef struct {
    V8 gate[MAX_LAYERS][4 * MAX_HIDDEN][CHUNK_BLOCKS];
    V8 in[MAX_LAYERS][MAX_IN][CHUNK_BLOCKS];
    float *lanes; /* per-lane sums, [weight][LANES] */
} Chunk;

/* One block's backward: recomputes the forward, then goes down the layers. */
INLINE void backward_block(const Kernel *kernel, const float *g, const float *hc, const float *grad_update,
                           const float *grad_next, float *grad_hc, Tape *t, Chunk *chunk, const int slot,
                           const int in_size, const int hidden, const int layers) {
    const int stride = 2 * hidden * layers;
    forward_block(kernel, g, hc, 0, stride, t, in_size, hidden, layers);
    const float *layer_w[MAX_LAYERS];
    for (int layer = 0; layer < layers; layer++) layer_w[layer] = kernel->weights + weights_at(in_size, hidden, layer);
    const int head = weights_at(in_size, hidden, layers);
    const float *w = kernel->weights + head;
    V8 bar_out;
    memcpy(&bar_out, grad_update, sizeof bar_out);
    bar_out *= ((const Options *)kernel->options)->out_mul;
    *(V8 *)&chunk->lanes[(head + hidden) * LANES] += bar_out;
    V8 bar_h[MAX_HIDDEN]; /* dL/dh' of the current layer */
    for (int j = 0; j < hidden; j++) {
        *(V8 *)&chunk->lanes[(head + j) * LANES] += bar_out * t->top[j];
        bar_h[j] = bar_out * w[j];
    }
    for (int layer = layers - 1; layer >= 0; layer--) {
        Layer *lt = &t->layer[layer];
        const int x_size = layer ? hidden : in_size, k_size = x_size + hidden, offset = layer * 2 * hidden;
        V8 *bar_gate = &chunk->gate[layer][0][0];
        for (int j = 0; j < hidden; j++) {
            V8 bar_h_next, bar_c_next;
            for (int l = 0; l < LANES; l++)
                bar_h_next[l] = grad_next[l * stride + offset + j], bar_c_next[l] = grad_next[l * stride + offset + hidden + j];
            const V8 i = lt->gate[j], f = lt->gate[hidden + j], cell = lt->gate[2 * hidden + j],
                     o = lt->gate[3 * hidden + j], tanh_c = lt->tanh_c[j];
            const V8 dh = bar_h[j] + bar_h_next;
            const V8 dc = bar_c_next + dh * o * (1.0f - tanh_c * tanh_c);
            bar_gate[j * CHUNK_BLOCKS + slot] = dc * cell * i * (1.0f - i);
            bar_gate[(hidden + j) * CHUNK_BLOCKS + slot] = dc * lt->c[j] * f * (1.0f - f);
            bar_gate[(2 * hidden + j) * CHUNK_BLOCKS + slot] = dc * i * (1.0f - cell * cell);
            bar_gate[(3 * hidden + j) * CHUNK_BLOCKS + slot] = dh * tanh_c * o * (1.0f - o);
            const V8 bar_c = dc * f;
            for (int l = 0; l < LANES; l++) grad_hc[l * stride + offset + hidden + j] = bar_c[l];
        }
        for (int k = 0; k < k_size; k++) chunk->in[layer][k][slot] = lt->in[k];
        V8 bar_in[MAX_IN]; /* dL/din = Wᵀ ḡate; the features are constants */
        inputs_backward(layer_w[layer], bar_gate + slot, layer ? 0 : x_size, k_size, 4 * hidden, bar_in);
        for (int j = 0; j < hidden; j++)
            for (int l = 0; l < LANES; l++) grad_hc[l * stride + offset + j] = bar_in[x_size + j][l];
        if (layer)
            for (int j = 0; j < hidden; j++) bar_h[j] = bar_in[j];
    }
}

/* W̄ += Σ_blocks ḡate inᵀ and b̄ += Σ ḡate over the chunk's first `used` blocks, into the per-lane sums. */
INLINE void sum_chunk(Chunk *chunk, const int used, const int in_size, const int hidden,
                      const int layers) {
    float *lanes = chunk->lanes;
    for (int layer = 0, x_size = in_size; layer < layers; layer++, x_size = hidden) {
        const int k_size = x_size + hidden, rows = 4 * hidden;
        for (int r = 0; r < rows; r += 2) {
            const V8 *g0 = chunk->gate[layer][r], *g1 = chunk->gate[layer][r + 1];
            for (int k = 0; k < k_size; k += 4) {
                V8 a[2][4] = {{{0}}};
                for (int s = 0; s < used; s++) {
                    for (int c = 0; c < 4; c++) {
                        if (k + c >= k_size) break;
                        const V8 x = chunk->in[layer][k + c][s];
                        a[0][c] += g0[s] * x, a[1][c] += g1[s] * x;
                    }
                }
                for (int c = 0; c < 4 && k + c < k_size; c++) {
                    *(V8 *)&lanes[(r * k_size + k + c) * LANES] += a[0][c];
                    *(V8 *)&lanes[((r + 1) * k_size + k + c) * LANES] += a[1][c];
                }
            }
            V8 b0 = {0}, b1 = {0};
            for (int s = 0; s < used; s++) b0 += g0[s], b1 += g1[s];
            *(V8 *)&lanes[(rows * k_size + r) * LANES] += b0;
            *(V8 *)&lanes[(rows * k_size + r + 1) * LANES] += b1;
        }
        lanes += (rows * (k_size + 1)) * LANES;
    }
}

INLINE void backward_run(const Kernel *kernel, const float *grad, int64_t first, int64_t n, int share,
                         const int in_size, const int hidden, const int layers) {
    const int stride = 2 * hidden * layers;
    const float *hc = kernel->state[0] + first * stride, *grad_update = kernel->state[1] + first,
                *grad_next = kernel->state[2] + first * stride;
    float *grad_hc = kernel->state[3] + first * stride;
    Chunk *chunk = (Chunk *)kernel->scratch + share;
    float *lanes = chunk->lanes;
    memset(lanes, 0, sizeof(float) * kernel->sums * LANES);
    Tape tape;
    int slot = 0;
    for (int64_t i = 0, chunks = 0; i < n; i += LANES) {
        if (i + LANES <= n) {
            backward_block(kernel, grad + i, hc + i * stride, grad_update + i, grad_next + i * stride,
                           grad_hc + i * stride, &tape, chunk, slot, in_size, hidden, layers);
        } else { /* the last, partial block: padded with zeros and no upstream gradient */
            float tail_grad[LANES] = {0}, tail_update[LANES] = {0};
            float tail_hc[LANES * 2 * MAX_HIDDEN * MAX_LAYERS] = {0}, tail_next[LANES * 2 * MAX_HIDDEN * MAX_LAYERS] = {0},
                  tail_out[LANES * 2 * MAX_HIDDEN * MAX_LAYERS];
            memcpy(tail_grad, grad + i, sizeof(float) * (n - i));
            memcpy(tail_update, grad_update + i, sizeof(float) * (n - i));
            memcpy(tail_hc, hc + i * stride, sizeof(float) * (n - i) * stride);
            memcpy(tail_next, grad_next + i * stride, sizeof(float) * (n - i) * stride);
            backward_block(kernel, tail_grad, tail_hc, tail_update, tail_next, tail_out, &tape, chunk, slot, in_size,
                           hidden, layers);
            memcpy(grad_hc + i * stride, tail_out, sizeof(float) * (n - i) * stride);
        }
        if (++slot == CHUNK_BLOCKS || i + LANES >= n) {
            sum_chunk(chunk, slot, in_size, hidden, layers);
            slot = 0;
            if (++chunks % FLUSH_CHUNKS == 0 || i + LANES >= n) flush_lanes(kernel, lanes, share);
        }
    }
}

static void backward_segment(const Kernel *kernel, const float *grad, float *unused, int64_t first, int64_t n,
                             int share) {
    (void)unused;
    const Options *o = kernel->options;
    if (o->in_size == 2 && o->hidden == 20 && o->layers == 2)
        backward_run(kernel, grad, first, n, share, 2, 20, 2);
    else
        backward_run(kernel, grad, first, n, share, o->in_size, o->hidden, o->layers);
}

int lstm_step_backward(int64_t n, const float *grad, float *const *state, float *grad_hc, const float *weights,
                       const Options *options, double *grad_weights, int threads) {
    if (!options_taken(options)) return -1;
    const int sums = weights_at(options->in_size, options->hidden, options->layers) + options->hidden + 1;
    float *const buffers[4] = {state[0], state[1], state[2], grad_hc};
    /* each share's chunk buffer and per-lane sums (about 1 MiB at the default shape) */
    const int shares = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    const size_t lane_bytes = ((size_t)sums * LANES * sizeof(float) + ALIGN - 1) / ALIGN * ALIGN;
    Chunk *chunks = aligned_alloc(ALIGN, (shares * sizeof(Chunk) + ALIGN - 1) / ALIGN * ALIGN);
    char *lanes = aligned_alloc(ALIGN, shares * lane_bytes);
    int status = -2;
    if (chunks && lanes) {
        for (int t = 0; t < shares; t++) chunks[t].lanes = (float *)(lanes + t * lane_bytes);
        const Kernel kernel = {buffers, weights, options, 0, sums, chunks};
        status = run_backward(backward_segment, kernel, n, grad, grad_hc, grad_weights, shares);
    }
    free(chunks);
    free(lanes);
    return status;
}
