// Generated from `src/kernels/policy_loss/contract.rs` by its test `generated_headers_are_current`
// (`SAPO_REGENERATE=1 cargo test --lib generated_headers`): do not edit.
#pragma once

#include "../../losses/soft_gate.h"
#include "../../losses/clip.h"
#include "../../losses/unclipped.h"
#include "../../losses/policy_gradient.h"
#include "../../losses/cispo.h"
#include "../../losses/dro.h"
#include "../../losses/kl_cov.h"
#include "../../losses/dppo.h"
#include "../../losses/vespo.h"
#include "../../losses/gmpo.h"
#include "../../losses/topr.h"
#include "../../losses/clip_cov.h"
#include "../../losses/gate_family.h"

// The objective's loss, slopes and metrics. An id no objective has (never sent by the
// crate) gives NaN, which the loss's check turns into an error.
SAPO_INLINE Eval shape_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  switch (p.shape) {
    case SAPO_OBJECTIVE_SOFT_GATE: return soft_gate_eval(p, t);
    case SAPO_OBJECTIVE_CLIP: return clip_eval(p, t);
    case SAPO_OBJECTIVE_UNCLIPPED: return unclipped_eval(p, t);
    case SAPO_OBJECTIVE_POLICY_GRADIENT: return policy_gradient_eval(p, t);
    case SAPO_OBJECTIVE_CISPO: return cispo_eval(p, t);
    case SAPO_OBJECTIVE_DRO: return dro_eval(p, t);
    case SAPO_OBJECTIVE_KL_COV: return kl_cov_eval(p, t);
    case SAPO_OBJECTIVE_DPPO: return dppo_eval(p, t);
    case SAPO_OBJECTIVE_VESPO: return vespo_eval(p, t);
    case SAPO_OBJECTIVE_GMPO: return gmpo_eval(p, t);
    case SAPO_OBJECTIVE_TOPR: return topr_eval(p, t);
    case SAPO_OBJECTIVE_CLIP_COV: return clip_cov_eval(p, t);
    case SAPO_OBJECTIVE_GATE_FAMILY: return gate_family_eval(p, t);
    default: return through_ratio(SAPO_NAN, SAPO_NAN);
  }
}

// The log-ratio the ratio is taken of, and its derivative (the identity but where an
// objective transforms it).
SAPO_INLINE Pair shape_log_ratio(SAPO_THREAD const PolicyParams& p, float x, float a) {
  switch (p.shape) {
    case SAPO_OBJECTIVE_GMPO: return gmpo_log_ratio(p, x, a);
    default: { Pair out; out.v = x; out.d = 1.0f; return out; }
  }
}

// Whether the objective reads a row statistic, the row sum of its `row_term`.
SAPO_INLINE bool shape_has_row_statistic(SAPO_THREAD const PolicyParams& p) {
  return false || p.shape == SAPO_OBJECTIVE_VESPO;
}

SAPO_INLINE float shape_row_term(SAPO_THREAD const PolicyParams& p, float delta, float w) {
  switch (p.shape) {
    case SAPO_OBJECTIVE_VESPO: return vespo_row_term(p, delta, w);
    default: return 0.0f;
  }
}

// Whether the rollout weights multiply the objective's per-token loss.
SAPO_INLINE bool shape_weights_multiply(SAPO_THREAD const PolicyParams& p) {
  return true && p.shape != SAPO_OBJECTIVE_VESPO;
}
