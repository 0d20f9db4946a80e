/* One fused CPU step of the phnn learned optimizer (metaopt/optimizers/phnn.py), float32, for a
   scalar state (state_dim 1), one hidden tanh layer per MLP and the semi-implicit Euler step:

     (normalize) v' = β v + (1 − β) g²,  g ← g / (√(v' / (1 − β^(t+1))) + 1e-8)
     f = log/sign features of g (p = 10), or g itself without preprocessing
     x = [f, p] with state features (sign-equivariant: [f, p·sign g]), else x = f
     ∂H/∂p(p) = p + Σ_j w_j (1 − tanh²(z_j)) W_j0,  z = W [p, f] + b      (learned energy)
     a = A₀ + MLP_R(x),  ṗ = −(g (1 + gain(x)) + offset(x)) − a² ∂H/∂p(p)  (learned R and port)
     p' = p + h ṗ,  θ += lr · h · ∂H/∂p(p')

   The batched update makes ~60 passes over [coordinates, hidden] tensors; this makes one pass over
   the gradient, the parameter and the state.

   sign-equivariant: the networks see only log|g| (or |g|), the port's offset is multiplied by sign g
   (e^10 g below e^-10), and the energy is averaged over ±p.

   state: p [total] (and v [total] with normalize).
   options: Options below. weights: packed by PHNN.fused_weights in weight_layout's order. */

#include "fused_common.h"

#define MAX_WIDTH 64

/* The settings, by name; PHNNKernelOptions (metaopt/optimizers/phnn.py) mirrors it field by field. */
typedef struct {
    int hidden, preprocess, learned_energy, learned_dissipation, learned_port, normalize, equivariant, state_features;
    float h, a0;                                /* step size, A₀ */
    float threshold, log_divisor, small_scale; /* the preprocessing: e^-10, 10, e^10 */
    float beta, one_minus_beta, correction;    /* normalize: β, 1 − β, 1 − β^(t+1) */
    float lr;
} Options;

/* Where each learned part's weights start (nn.Linear weights are [out, in]); a part that is not
   learned takes no room:
     energy W [hidden, 1 + features], b [hidden], w [hidden]
     dissipation W [hidden, inputs], b [hidden], w [hidden], c [1]
     port W [hidden, inputs], b [hidden], W_out [2, hidden] (gain, offset), b_out [2]
   with inputs = features, plus 1 with state features. */
typedef struct {
    int energy_W, energy_b, energy_w, dissipation_W, dissipation_b, dissipation_w, dissipation_c, port_W, port_b,
        port_w, port_c, total;
} Layout;

INLINE Layout weight_layout(const int hidden, const int features, const int inputs, const int learned_energy,
                            const int learned_dissipation, const int learned_port) {
    Layout o;
    o.energy_W = 0, o.energy_b = hidden * (1 + features), o.energy_w = o.energy_b + hidden;
    o.dissipation_W = learned_energy ? o.energy_w + hidden : 0;
    o.dissipation_b = o.dissipation_W + hidden * inputs, o.dissipation_w = o.dissipation_b + hidden;
    o.dissipation_c = o.dissipation_w + hidden;
    o.port_W = learned_dissipation ? o.dissipation_c + 1 : o.dissipation_W;
    o.port_b = o.port_W + hidden * inputs, o.port_w = o.port_b + hidden, o.port_c = o.port_w + 2 * hidden;
    o.total = learned_port ? o.port_c + 2 : o.port_W;
    return o;
}

/* tanh (fused_common.h's rational approximation), branch-free so that it vectorises. */
INLINE float tanh_approx(float x) {
    x = x < -TANH_LIMIT ? -TANH_LIMIT : x;
    x = x > TANH_LIMIT ? TANH_LIMIT : x;
    const float x2 = x * x;
    return x * TANH_P(x2) / TANH_Q(x2);
}

/* ∂H/∂p at p with the learned energy's weights W [hidden, 1 + features], b, w; with `even`, of the
   energy averaged over ±p. */
INLINE float energy_grad(const float *W, const float *b, const float *w, float p, const float *f, const int features,
                         const int hidden, const int even) {
    float sum = 0.0f;
#pragma GCC unroll 64
    for (int j = 0; j < hidden; j++) {
        float z = b[j];
        for (int c = 0; c < features; c++) z += W[j * (1 + features) + 1 + c] * f[c];
        const float t = tanh_approx(z + W[j * (1 + features)] * p);
        if (even) {
            const float t_minus = tanh_approx(z - W[j * (1 + features)] * p);
            sum += 0.5f * w[j] * ((1.0f - t * t) - (1.0f - t_minus * t_minus)) * W[j * (1 + features)];
        } else {
            sum += w[j] * (1.0f - t * t) * W[j * (1 + features)];
        }
    }
    return p + sum;
}

INLINE void step_coordinates(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n,
                             const int hidden, const int preprocess, const int learned_energy,
                             const int learned_dissipation, const int learned_port, const int normalize,
                             const int equivariant, const int state_features) {
    const Options *o = kernel->options;
    const float h = o->h, a0 = o->a0, threshold = o->threshold, log_divisor = o->log_divisor,
                small_scale = o->small_scale, beta = o->beta, one_minus_beta = o->one_minus_beta,
                correction = o->correction, lr = o->lr;
    const int features = preprocess && !equivariant ? 2 : 1, inputs = features + state_features;
    const Layout L = weight_layout(hidden, features, inputs, learned_energy, learned_dissipation, learned_port);
    const float *w = kernel->weights;
    const float *energy = w + L.energy_W, *energy_b = w + L.energy_b, *energy_w = w + L.energy_w;
    const float *dissipation = w + L.dissipation_W, *dissipation_b = w + L.dissipation_b,
                *dissipation_w = w + L.dissipation_w, *dissipation_c = w + L.dissipation_c;
    const float *port = w + L.port_W, *port_b = w + L.port_b, *port_w = w + L.port_w, *port_c = w + L.port_c;
    float *p_state = kernel->state[0] + first, *v_state = normalize ? kernel->state[1] + first : 0;

    for (int64_t i = 0; i < n; i++) {
        float g = grad[i];
        if (normalize) {
            const float v = beta * v_state[i] + one_minus_beta * g * g;
            v_state[i] = v;
            g = g / (sqrtf(v / correction) + 1e-8f);
        }
        /* f: log_sign(g), or g. With `equivariant` the networks see only the even part (log|g| / p, or
           |g|) and `odd` the rest. */
        float f[3], odd = 1.0f;
        if (preprocess) {
            log_sign(g, threshold, log_divisor, small_scale, &f[0], &f[1]);
            odd = f[1];
        } else {
            f[0] = equivariant ? fabsf(g) : g;
            odd = (g > 0.0f ? 1.0f : 0.0f) - (g < 0.0f ? 1.0f : 0.0f);
        }
        const float p = p_state[i];
        if (state_features) f[features] = equivariant ? p * odd : p; /* only MLP_R and the port read it */
        const float dh_dp =
            learned_energy ? energy_grad(energy, energy_b, energy_w, p, f, features, hidden, equivariant) : p;
        float a = a0, gain = 0.0f, offset = 0.0f;
        if (learned_dissipation || learned_port) {
            float a_sum = 0.0f;
            if (learned_dissipation) a_sum = dissipation_c[0];
            if (learned_port) {
                gain = port_c[0];
                offset = port_c[1];
            }
#pragma GCC unroll 64
            for (int j = 0; j < hidden; j++) {
                if (learned_dissipation) {
                    float z = dissipation_b[j];
                    for (int c = 0; c < inputs; c++) z += dissipation[j * inputs + c] * f[c];
                    a_sum += dissipation_w[j] * tanh_approx(z);
                }
                if (learned_port) {
                    float z = port_b[j];
                    for (int c = 0; c < inputs; c++) z += port[j * inputs + c] * f[c];
                    const float t = tanh_approx(z);
                    gain += port_w[j] * t;
                    offset += port_w[hidden + j] * t;
                }
            }
            a = a0 + a_sum;
            if (equivariant) offset *= odd;
        }
        const float force = learned_port ? -(g * (1.0f + gain) + offset) : -g;
        const float p_next = p + h * (force - a * a * dh_dp);
        p_state[i] = p_next;
        const float velocity =
            learned_energy ? energy_grad(energy, energy_b, energy_w, p_next, f, features, hidden, equivariant) : p_next;
        param[i] += lr * (h * velocity);
    }
}

static void step_segment(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n,
                         int share) {
    const Options *o = kernel->options;
    const int usual = o->hidden == 16 && o->preprocess && o->learned_energy && o->learned_dissipation && o->learned_port;
    if (usual && !o->normalize && !o->equivariant && !o->state_features) /* the default phnn */
        step_coordinates(kernel, grad, param, first, n, 16, 1, 1, 1, 1, 0, 0, 0);
    else if (usual && o->normalize && !o->equivariant && !o->state_features) /* normalize */
        step_coordinates(kernel, grad, param, first, n, 16, 1, 1, 1, 1, 1, 0, 0);
    else if (usual && o->normalize && o->equivariant && !o->state_features) /* the ReLU transfer */
        step_coordinates(kernel, grad, param, first, n, 16, 1, 1, 1, 1, 1, 1, 0);
    else
        step_coordinates(kernel, grad, param, first, n, o->hidden, o->preprocess, o->learned_energy,
                         o->learned_dissipation, o->learned_port, o->normalize, o->equivariant, o->state_features);
}

int phnn_step(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
              float *const *state, const float *weights, const Options *options, int threads) {
    if (options->hidden < 1 || options->hidden > MAX_WIDTH) return -1;
    const Kernel kernel = {state, weights, options, 0, 0};
    run_threads(step_segment, &kernel, segments, sizes, params, grads, threads);
    return 0;
}

/* ---- Backward, for meta-training: the gradients of one step w.r.t. p and every weight. ----

   For the usual phnn only (everything learned, not sign-equivariant), first-order: g is a constant.
   state: p, dL/dΔθ, dL/dp', v (normalize; else unused) (all [total]); writes dL/dp into grad_p.
   The weights' gradients are summed per coordinate lane (LANES independent float sums, so the loop
   vectorises without reassociation), flushed into per-share double sums every FLUSH_BLOCKS blocks and
   added share by share in order, so the result does not depend on thread timing. Their layout is the
   weights' one, then dL/dh and dL/dA₀. */

#define MAX_WEIGHTS (MAX_WIDTH * 5 + MAX_WIDTH * 4 + 1 + MAX_WIDTH * 5 + 2)


/* The backward of LANES consecutive coordinates, written lane-wise so that every statement vectorises;
   the weights' gradients are added to acc[k * LANES + lane]. */
INLINE void backward_block(const Kernel *kernel, const float *grad, const float *p, const float *v,
                           const float *grad_update, const float *grad_p_next, float *grad_p, float *acc,
                           const int hidden, const int preprocess, const int normalize) {
    const Options *o = kernel->options;
    const float *w = kernel->weights;
    const float h = o->h, a0 = o->a0, threshold = o->threshold, log_divisor = o->log_divisor,
                small_scale = o->small_scale, beta = o->beta, one_minus_beta = o->one_minus_beta,
                correction = o->correction;
    const int F = preprocess ? 2 : 1;
    const Layout L = weight_layout(hidden, F, F, 1, 1, 1);
    const int W = L.energy_W, bH = L.energy_b, wH = L.energy_w, total = L.total;
    const int R = L.dissipation_W, bR = L.dissipation_b, uR = L.dissipation_w, cR = L.dissipation_c;
    const int Q = L.port_W, bQ = L.port_b, P = L.port_w, pc = L.port_c;
#define ACC(k) (acc + (int64_t)(k) * LANES)

    Lanes g, f[2];
    EACH g[l] = grad[l];
    if (normalize) EACH g[l] = g[l] / (sqrtf((beta * v[l] + one_minus_beta * g[l] * g[l]) / correction) + 1e-8f);
    if (preprocess) {
        EACH log_sign(g[l], threshold, log_divisor, small_scale, &f[0][l], &f[1][l]);
    } else {
        EACH f[0][l] = g[l];
    }
    Lanes t_p[MAX_WIDTH], t_next[MAX_WIDTH], r[MAX_WIDTH], q[MAX_WIDTH], z_f[MAX_WIDTH];
    Lanes energy, slope, a, gain, offset, force, rate, p_next, energy_next, slope_next;
    EACH {
        energy[l] = p[l], slope[l] = 1.0f; /* ∂H/∂p and ∂²H/∂p² at p */
        a[l] = a0 + w[cR], gain[l] = w[pc], offset[l] = w[pc + 1];
    }
    for (int j = 0; j < hidden; j++) {
        const float w0 = w[W + j * (1 + F)], wj = w[wH + j];
        Lanes z, y, x;
        EACH z[l] = w[bH + j], y[l] = w[bR + j], x[l] = w[bQ + j];
        for (int c = 0; c < F; c++) {
            const float wz = w[W + j * (1 + F) + 1 + c], wy = w[R + j * F + c], wx = w[Q + j * F + c];
            EACH z[l] += wz * f[c][l], y[l] += wy * f[c][l], x[l] += wx * f[c][l];
        }
        EACH {
            z_f[j][l] = z[l];
            const float t = tanh_approx(z[l] + w0 * p[l]);
            t_p[j][l] = t;
            energy[l] += wj * (1.0f - t * t) * w0;
            slope[l] -= 2.0f * wj * w0 * w0 * t * (1.0f - t * t);
            r[j][l] = tanh_approx(y[l]);
            a[l] += w[uR + j] * r[j][l];
            q[j][l] = tanh_approx(x[l]);
            gain[l] += w[P + j] * q[j][l];
            offset[l] += w[P + hidden + j] * q[j][l];
        }
    }
    EACH {
        force[l] = -(g[l] * (1.0f + gain[l]) + offset[l]);
        rate[l] = force[l] - a[l] * a[l] * energy[l];
        p_next[l] = p[l] + h * rate[l];
        energy_next[l] = p_next[l], slope_next[l] = 1.0f;
    }
    for (int j = 0; j < hidden; j++) {
        const float w0 = w[W + j * (1 + F)], wj = w[wH + j];
        EACH {
            const float t = tanh_approx(z_f[j][l] + w0 * p_next[l]);
            t_next[j][l] = t;
            energy_next[l] += wj * (1.0f - t * t) * w0;
            slope_next[l] -= 2.0f * wj * w0 * w0 * t * (1.0f - t * t);
        }
    }

    /* Δθ = h ∂H/∂p(p'), p' = p + h (−(g (1 + gain) + offset) − a² ∂H/∂p(p)) */
    Lanes bar_p_next, alpha_next, alpha, bar_a, bar_gain, bar_offset;
    EACH {
        bar_p_next[l] = grad_p_next[l] + grad_update[l] * h * slope_next[l];
        grad_p[l] = bar_p_next[l] * (1.0f - h * a[l] * a[l] * slope[l]);
        ACC(total)[l] += grad_update[l] * energy_next[l] + bar_p_next[l] * rate[l]; /* dL/dh */
        alpha_next[l] = grad_update[l] * h, alpha[l] = -bar_p_next[l] * h * a[l] * a[l];
        bar_a[l] = -2.0f * bar_p_next[l] * h * a[l] * energy[l];
        bar_gain[l] = -bar_p_next[l] * h * g[l], bar_offset[l] = -bar_p_next[l] * h;
        ACC(total + 1)[l] += bar_a[l]; /* dL/dA₀ */
        ACC(cR)[l] += bar_a[l];
        ACC(pc)[l] += bar_gain[l];
        ACC(pc + 1)[l] += bar_offset[l];
    }
    for (int j = 0; j < hidden; j++) {
        const float w0 = w[W + j * (1 + F)], wj = w[wH + j], u = w[uR + j], gain_w = w[P + j],
                    offset_w = w[P + hidden + j];
        Lanes bar_z, bar_y, bar_x;
        EACH {
            const float s_next = 1.0f - t_next[j][l] * t_next[j][l], s_p = 1.0f - t_p[j][l] * t_p[j][l];
            const float kappa_next = -2.0f * wj * w0 * t_next[j][l] * s_next;
            const float kappa_p = -2.0f * wj * w0 * t_p[j][l] * s_p;
            bar_z[l] = alpha_next[l] * kappa_next + alpha[l] * kappa_p; /* through ∂H/∂p's tanh arguments */
            ACC(wH + j)[l] += (alpha_next[l] * s_next + alpha[l] * s_p) * w0;
            ACC(W + j * (1 + F))[l] += alpha_next[l] * (wj * s_next + kappa_next * p_next[l]) +
                                       alpha[l] * (wj * s_p + kappa_p * p[l]);
            ACC(bH + j)[l] += bar_z[l];
            bar_y[l] = bar_a[l] * u * (1.0f - r[j][l] * r[j][l]);
            ACC(uR + j)[l] += bar_a[l] * r[j][l];
            ACC(bR + j)[l] += bar_y[l];
            bar_x[l] = (bar_gain[l] * gain_w + bar_offset[l] * offset_w) * (1.0f - q[j][l] * q[j][l]);
            ACC(P + j)[l] += bar_gain[l] * q[j][l];
            ACC(P + hidden + j)[l] += bar_offset[l] * q[j][l];
            ACC(bQ + j)[l] += bar_x[l];
        }
        for (int c = 0; c < F; c++) {
            float *wz = ACC(W + j * (1 + F) + 1 + c), *wy = ACC(R + j * F + c), *wx = ACC(Q + j * F + c);
            EACH wz[l] += bar_z[l] * f[c][l], wy[l] += bar_y[l] * f[c][l], wx[l] += bar_x[l] * f[c][l];
        }
    }
#undef ACC
}

INLINE void backward_run(const Kernel *kernel, const float *grad, float *grad_p, int64_t first, int64_t n, int share,
                         const int hidden, const int preprocess, const int normalize) {
    const float *p = kernel->state[0] + first, *grad_update = kernel->state[1] + first,
                *grad_p_next = kernel->state[2] + first, *v = kernel->state[3] + first;
    float lanes[(MAX_WEIGHTS + 2) * LANES];
    memset(lanes, 0, sizeof(float) * kernel->sums * LANES);
    for (int64_t i = 0, blocks = 1; i < n; i += LANES, blocks++) {
        if (i + LANES <= n) {
            backward_block(kernel, grad + i, p + i, v + i, grad_update + i, grad_p_next + i, grad_p + i, lanes, hidden,
                           preprocess, normalize);
        } else { /* the last, partial block: padded with the last coordinate and no upstream gradient */
            Lanes tail[6];
            for (int l = 0; l < LANES; l++) {
                const int64_t k = i + l < n ? i + l : n - 1;
                const float keep = i + l < n ? 1.0f : 0.0f;
                tail[0][l] = grad[k], tail[1][l] = p[k], tail[2][l] = v[k];
                tail[3][l] = keep * grad_update[k], tail[4][l] = keep * grad_p_next[k];
            }
            backward_block(kernel, tail[0], tail[1], tail[2], tail[3], tail[4], tail[5], lanes, hidden, preprocess,
                           normalize);
            for (int64_t k = i; k < n; k++) grad_p[k] = tail[5][k - i];
        }
        if (blocks % FLUSH_BLOCKS == 0 || i + LANES >= n) flush_lanes(kernel, lanes, share);
    }
}

static void backward_segment(const Kernel *kernel, const float *grad, float *grad_p, int64_t first, int64_t n,
                             int share) {
    const Options *o = kernel->options; /* as the forward's */
    if (o->hidden == 16 && o->preprocess && !o->normalize)
        backward_run(kernel, grad, grad_p, first, n, share, 16, 1, 0);
    else if (o->hidden == 16 && o->preprocess && o->normalize)
        backward_run(kernel, grad, grad_p, first, n, share, 16, 1, 1);
    else
        backward_run(kernel, grad, grad_p, first, n, share, o->hidden, o->preprocess, o->normalize);
}

int phnn_step_backward(int64_t n, const float *grad, float *const *state, float *grad_p, const float *weights,
                       const Options *options, double *grad_weights, int threads) {
    const Options *o = options;
    if (o->hidden < 1 || o->hidden > MAX_WIDTH || !o->learned_energy || !o->learned_dissipation ||
        !o->learned_port || o->equivariant || o->state_features)
        return -1;
    const int F = o->preprocess ? 2 : 1;
    const int sums = weight_layout(o->hidden, F, F, 1, 1, 1).total + 2; /* the weights, dL/dh, dL/dA₀ */
    const Kernel kernel = {state, weights, options, 0, sums};
    return run_backward(backward_segment, kernel, n, grad, grad_p, grad_weights, threads);
}
