/* One fused CPU step of the phnn learned optimizer (metaopt/optimizers/phnn.py), float32, for a
   scalar state (state_dim 1), one hidden tanh layer per MLP and the semi-implicit Euler step:

     (normalize) v' = β v + (1 − β) g²,  g ← g / (√(v' / (1 − β^(t+1))) + 1e-8)
     f = log/sign features of g (p = 10), or g itself without preprocessing
     ∂H/∂p(p) = p + Σ_j w_j (1 − tanh²(z_j)) W_j0,  z = W [p, f] + b      (learned energy)
     a = A₀ + MLP_R(f),  ṗ = −(g (1 + gain(f)) + offset(f)) − a² ∂H/∂p(p)  (learned R and port)
     p' = p + h ṗ,  θ += lr · h · ∂H/∂p(p')

   The batched update makes ~60 passes over [coordinates, hidden] tensors; this makes one pass over
   the gradient, the parameter and the state.

   sign-equivariant: the networks see only log|g| (or |g|), the port's offset is multiplied by sign g
   (e^10 g below e^-10), and the energy is averaged over ±p.

   state: p [total] (and v [total] with normalize).
   shape: hidden, preprocess, learned energy, learned dissipation, learned port, normalize,
          sign-equivariant.
   scalars: h, A₀, e^-10, 10, e^10 (the preprocessing), β, 1 − β, 1 − β^(t+1), lr.
   weights, packed by PHNN.fused_step, each block only when learned (nn.Linear weights [out, in]):
     energy W [hidden, 1 + features], b [hidden], w [hidden]
     dissipation W [hidden, features], b [hidden], w [hidden], c [1]
     port W [hidden, features], b [hidden], W_out [2, hidden] (gain, offset), b_out [2] */

#include "fused_common.h"

#define MAX_WIDTH 64

/* tanh within 4e-7 (Eigen's rational approximation), branch-free so that it vectorises. */
INLINE float tanh_approx(float x) {
    x = x < -7.90531110763549805f ? -7.90531110763549805f : x > 7.90531110763549805f ? 7.90531110763549805f : x;
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
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
                             const int equivariant) {
    const float *s = kernel->scalars;
    const float h = s[0], a0 = s[1], threshold = s[2], log_divisor = s[3], small_scale = s[4], beta = s[5],
                one_minus_beta = s[6], correction = s[7], lr = s[8];
    const int features = preprocess && !equivariant ? 2 : 1;
    const float *energy = kernel->weights, *dissipation = energy + (learned_energy ? hidden * (2 + features) + hidden : 0),
                *port = dissipation + (learned_dissipation ? hidden * (features + 2) + 1 : 0);
    const float *energy_b = energy + hidden * (1 + features), *energy_w = energy_b + hidden;
    const float *dissipation_b = dissipation + hidden * features, *dissipation_w = dissipation_b + hidden,
                *dissipation_c = dissipation_w + hidden;
    const float *port_b = port + hidden * features, *port_w = port_b + hidden, *port_c = port_w + 2 * hidden;
    float *p_state = kernel->state[0] + first, *v_state = normalize ? kernel->state[1] + first : 0;

    for (int64_t i = 0; i < n; i++) {
        float g = grad[i];
        if (normalize) {
            const float v = beta * v_state[i] + one_minus_beta * g * g;
            v_state[i] = v;
            g = g / (sqrtf(v / correction) + 1e-8f);
        }
        /* f: (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g), branch-free; or g. With
           `equivariant` the networks see only the even part (log|g| / p, or |g|) and `odd` the rest. */
        float f[2], odd = 1.0f;
        const float magnitude = fabsf(g), sign = g > 0.0f ? 1.0f : g < 0.0f ? -1.0f : 0.0f;
        if (preprocess) {
            const float log_magnitude = log_nonnegative(magnitude) / log_divisor;
            const int large = magnitude >= threshold;
            f[0] = large ? log_magnitude : -1.0f;
            f[1] = large ? sign : g * small_scale;
            odd = f[1];
        } else {
            f[0] = equivariant ? magnitude : g;
            odd = sign;
        }
        const float p = p_state[i];
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
                    for (int c = 0; c < features; c++) z += dissipation[j * features + c] * f[c];
                    a_sum += dissipation_w[j] * tanh_approx(z);
                }
                if (learned_port) {
                    float z = port_b[j];
                    for (int c = 0; c < features; c++) z += port[j * features + c] * f[c];
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

static void step_segment(const Kernel *kernel, const float *grad, float *param, int64_t first, int64_t n) {
    /* shape: hidden, preprocess, learned energy, dissipation, port, normalize, sign-equivariant */
    const int *shape = kernel->shape, usual = shape[0] == 16 && shape[1] && shape[2] && shape[3] && shape[4];
    if (usual && !shape[5] && !shape[6]) /* the default phnn */
        step_coordinates(kernel, grad, param, first, n, 16, 1, 1, 1, 1, 0, 0);
    else if (usual && shape[5] && !shape[6]) /* normalize */
        step_coordinates(kernel, grad, param, first, n, 16, 1, 1, 1, 1, 1, 0);
    else if (usual && shape[5] && shape[6]) /* normalize and sign-equivariant: the ReLU transfer */
        step_coordinates(kernel, grad, param, first, n, 16, 1, 1, 1, 1, 1, 1);
    else
        step_coordinates(kernel, grad, param, first, n, shape[0], shape[1], shape[2], shape[3], shape[4], shape[5],
                         shape[6]);
}

int phnn_step(int64_t segments, const int64_t *sizes, float *const *params, const float *const *grads,
              float *const *state, const float *weights, const int *shape, const float *scalars, int threads) {
    if (shape[0] < 1 || shape[0] > MAX_WIDTH) return -1;
    const Kernel kernel = {state, weights, shape, scalars};
    run_threads(step_segment, &kernel, segments, sizes, params, grads, threads);
    return 0;
}
