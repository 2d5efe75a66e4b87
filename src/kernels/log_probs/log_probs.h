// Token log-probs and entropy on the GPU (CUDA and Metal, see `../gpu/common.h`), forward and
// backward, one block per row of logits. The entry points are `log_probs.cu` and
// `log_probs.metal`.
//
// Forward: each thread folds its strided share of the row into an online (max, Σe^{z−max},
// Σe^{z−max}·z); the block combines the threads' states in a fixed order (rescaled to the row's
// maximum), and thread 0 writes (ℓ, H, lse). A target id outside [0, V) makes the row's ℓ and H
// NaN (the policy loss then reports non-finite log-probs): the check needs no host read.
// Backward: the softmax recomputed on the fly, the logits' gradient written once.
//
// The scalar formulas (`logprobs.rs`) and the online softmax are in `../gpu/softmax.h`, shared
// with the fused linear path; the tests run both dialects in simulation against the CPU kernel.
#pragma once

#include "../gpu/softmax.h"

// The target id of row `i` as a signed 64-bit value.
template <typename I>
SAPO_INLINE sapo_i64 target_id(SAPO_GLOBAL const I* targets, long i) {
  return (sapo_i64)targets[i];
}

// `scratch`: shared memory of 2·SAPO_MAX_WARPS floats.
template <typename F, typename I>
SAPO_INLINE void log_probs_forward(SapoThread th, SAPO_GLOBAL const F* logits,
                                   SAPO_GLOBAL const I* targets, long vocab, float inv_t,
                                   long rows, SAPO_GLOBAL float* out,
                                   SAPO_SHARED float* scratch) {
  const long row = th.block;
  SAPO_GLOBAL const F* x = logits + row * vocab;
  OnlineSoftmax state = online_empty();
  for (long v = th.index; v < vocab; v += th.threads) online_add(state, sapo_load(x, v) * inv_t);
  state = online_block_combine(state, scratch, th);
  if (th.index == 0) {
    sapo_i64 target = target_id(targets, row);
    bool valid = target >= 0 && target < vocab;
    RowLogProb r = finish_row(state, valid ? sapo_load(x, (long)target) * inv_t : SAPO_NAN);
    out[row] = r.log_prob;
    out[rows + row] = r.entropy;
    out[2 * rows + row] = r.lse;
  }
}

template <typename F, typename I>
SAPO_INLINE void log_probs_backward(SapoThread th, SAPO_GLOBAL const F* logits,
                                    SAPO_GLOBAL const I* targets, long vocab, float inv_t,
                                    long rows, SAPO_GLOBAL const float* res,
                                    SAPO_GLOBAL const float* grad_res, SAPO_GLOBAL F* grad) {
  const long row = th.block;
  SAPO_GLOBAL const F* x = logits + row * vocab;
  SAPO_GLOBAL F* g = grad + row * vocab;
  float lse = res[2 * rows + row], entropy = res[rows + row];
  float g_lp = grad_res[row], g_h = grad_res[rows + row];
  sapo_i64 target = target_id(targets, row);
  // A silent row (no upstream gradient, or garbage) gets zeros.
  bool silent = (g_lp == 0.0f && g_h == 0.0f) || !sapo_isfinite(lse);
  for (long v = th.index; v < vocab; v += th.threads) {
    float value = 0.0f;
    if (!silent) {
      value = logit_gradient(sapo_load(x, v), inv_t, lse, entropy, g_lp, g_h);
      if (v == target) value += inv_t * g_lp;
    }
    sapo_store(g, v, value);
  }
}

// Every (logits, targets) storage pair, as `ENTRY(F, I, NAME)`.
#define SAPO_LOG_PROBS_TYPES(ENTRY)  \
  ENTRY(float, unsigned char, f32_u8)  \
  ENTRY(float, unsigned int, f32_u32)  \
  ENTRY(float, sapo_i64, f32_i64)      \
  ENTRY(F16, unsigned char, f16_u8)    \
  ENTRY(F16, unsigned int, f16_u32)    \
  ENTRY(F16, sapo_i64, f16_i64)        \
  ENTRY(BF16, unsigned char, bf16_u8)  \
  ENTRY(BF16, unsigned int, bf16_u32)  \
  ENTRY(BF16, sapo_i64, bf16_i64)
