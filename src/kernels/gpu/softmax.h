// The online softmax of a row of logits on the GPU (CUDA and Metal, see `common.h`), shared by
// the token log-probs (`log_probs/log_probs.h`) and the fused linear path's tile kernels
// (`linear_log_probs/linear_log_probs.h`). The scalar formulas restate `logprobs.rs`
// (`weighted_logit`, `finish_row`, `logit_gradient`); the tests run both kernels in simulation
// against the CPU kernels, which run those.
#pragma once

#include "common.h"

// logprobs.rs, weighted_logit: p_v·z_v up to the normaliser; 0 where e = 0 (z = −∞).
SAPO_INLINE float weighted_logit(float e, float z) { return e > 0.0f ? e * z : 0.0f; }

// logprobs.rs, logit_gradient: ∂(g_ℓ·ℓ + g_H·H)/∂x of one logit x (z = x/T), without the
// target's own g_ℓ/T.
SAPO_INLINE float logit_gradient(float x, float inv_t, float lse, float entropy,
                                                float grad_log_prob, float grad_entropy) {
  float z = x * inv_t;
  float p = sapo_exp(z - lse);
  float term = p > 0.0f ? p * (z - lse + entropy) : 0.0f;
  return -(inv_t * (grad_log_prob * p + grad_entropy * term));
}

// A running (max, Σe^{z−max}, Σe^{z−max}·z).
struct OnlineSoftmax {
  float max, sum, weighted;
};

SAPO_INLINE OnlineSoftmax online_empty() {
  OnlineSoftmax s;
  s.max = -SAPO_INF;
  s.sum = 0.0f;
  s.weighted = 0.0f;
  return s;
}

// Folds one scaled logit z into a thread's state (online maximum: what was summed against the
// old maximum is rescaled).
SAPO_INLINE void online_add(SAPO_THREAD OnlineSoftmax& s, float z) {
  if (z > s.max) {
    float scale = sapo_exp(s.max - z);
    s.sum *= scale;
    s.weighted *= scale;
    s.max = z;
  }
  if (s.max > -SAPO_INF) {
    float e = sapo_exp(z - s.max);
    s.sum += e;
    s.weighted += weighted_logit(e, z);
  }
}

// The block's state from every thread's: the block maximum, then every thread's sums rescaled to
// it and summed in a fixed order. Every thread gets the result. `scratch`: shared memory of
// 2·SAPO_MAX_WARPS floats.
SAPO_INLINE OnlineSoftmax online_block_combine(OnlineSoftmax s, SAPO_SHARED float* scratch,
                                               SapoThread th) {
  float lo = s.max, block_max = s.max;
  sapo_block_min_max(lo, block_max, scratch, th);
  float scale = s.max > -SAPO_INF ? sapo_exp(s.max - block_max) : 0.0f;
  float sums[2] = {s.sum * scale, s.weighted * scale};
  sapo_block_sum<2>(sums, scratch, th);
  OnlineSoftmax out;
  out.max = block_max;
  out.sum = sums[0];
  out.weighted = sums[1];
  return out;
}

// logprobs.rs, finish_row: (ℓ, H, lse) of a row from its state and the target's scaled logit;
// NaN ℓ and H when lse is not finite or the target is unknown (`z_target` NaN).
struct RowLogProb {
  float log_prob, entropy, lse;
};

SAPO_INLINE RowLogProb finish_row(OnlineSoftmax s, float z_target) {
  RowLogProb r;
  r.lse = s.max + sapo_log(s.sum);
  r.log_prob = SAPO_NAN;
  r.entropy = SAPO_NAN;
  if (sapo_isfinite(r.lse) && z_target == z_target) {
    r.log_prob = z_target - r.lse;
    r.entropy = r.lse - s.weighted / s.sum;
  }
  return r;
}
