// The fused policy loss on the GPU (CUDA and Metal, see `../gpu/common.h`; entry points in
// `policy_loss.cu` and `policy_loss.metal`): loss, metric sums, value checks and ∂loss/∂ℓ of every ratio
// level × trust region × aggregation × KL estimator × rollout weights, in three launches with no
// host read between them:
//
//   1. `prepass`  (one block per row): the row's token count, its mask values other than 0/1,
//                 and where needed Σ m·y (sequence levels) and Σ m·row_term (VESPO);
//   2. `rows`     (one block per row): the batch totals (every block reduces the same row counts
//                 in the same order), the row's coefficients, one sweep over the tokens (two at
//                 the `Sequence` level, whose gradient shares ∂l/∂s), the gradient, the row's sums;
//   3. `reduce`   (one block): the rows in order, in `sapo_wide` (f64 on CUDA, f32 on Metal),
//                 into the output
//                 `[loss, sums (16), ratio min, ratio max, non-finite/invalid counts (6)]`.
//
// This file is the traversal: loads, the ratio chain, sums, reductions. The objectives' device
// functions sit beside their Rust files (`losses/<name>.h`), dispatched by the generated
// `objectives.h`; the structs and constants shared with Rust are the generated `contract.h`;
// the scalar formulas the objectives share are `token.h`. The tests run this file in simulation
// against the CPU kernel.
#pragma once

#include "../gpu/common.h"
#include "contract.h"
#include "token.h"
#include "objectives.h"

// ---- aggregation.rs, `CoefficientParts::apply` ----
SAPO_INLINE sapo_wide row_coefficient(SAPO_THREAD const AggregationParams& g, sapo_wide n,
                                                  sapo_wide tokens, sapo_wide sequences, sapo_wide rows) {
  sapo_wide count = 1.0;
  if (g.batch == SAPO_BATCH_TOKENS) count = tokens;
  if (g.batch == SAPO_BATCH_SEQUENCES) count = sequences;
  if (g.batch == SAPO_BATCH_ROWS) count = rows;
  if (g.batch != SAPO_BATCH_ONE && g.global >= 0.0f) count = (sapo_wide)g.global;
  if (count < 1.0) count = 1.0;
  sapo_wide row = 1.0;
  if (g.row == SAPO_ROW_TOKENS) row = n < 1.0 ? 1.0 : n;
  if (g.row == SAPO_ROW_CONSTANT) row = (sapo_wide)g.row_constant;
  return (sapo_wide)g.world * (1.0 / (count * row));
}

// ---- kernels/policy_loss/cpu.rs: the per-token chain (ratio terms, shape, gradient) ----
struct SequenceRatio { float s, ds, excess, row; };
struct RatioTerms { float delta, r, dr, factor; };

SAPO_INLINE RatioTerms ratio_terms(SAPO_THREAD const PolicyParams& p, float lp, float old,
                                                  float adv, SequenceRatio seq) {
  Pair delta = clamp_d(lp - old, -p.clamp, p.clamp);
  Pair y = shape_log_ratio(p, delta.v, adv);
  Pair rho = ratio_d(y.v);
  RatioTerms out;
  out.delta = delta.v;
  out.factor = delta.d * y.d;
  out.r = p.level == SAPO_LEVEL_TOKEN ? rho.v : seq.s;
  out.dr = p.level == SAPO_LEVEL_TOKEN ? rho.d * out.factor
                                   : (p.level == SAPO_LEVEL_SEQUENCE_TOKEN ? seq.ds : 0.0f);
  return out;
}

// One token's inputs, loaded with masked positions zeroed.
struct Loaded { float keep, lp, old, adv, w, rf, flag; int bad[5]; };

template <typename F, typename M>
SAPO_INLINE Loaded load_token(SAPO_THREAD const PolicyParams& p, long row, long j,
                              SAPO_GLOBAL const F* lp, SAPO_GLOBAL const F* old,
                              SAPO_GLOBAL const F* adv, SAPO_GLOBAL const M* mask,
                              SAPO_GLOBAL const F* w, SAPO_GLOBAL const F* rf,
                              SAPO_GLOBAL const F* flags) {
  Loaded x;
  long at = row * p.t + j;
  bool keep = sapo_load(mask, at) != 0.0f;
  float v[5];
  v[0] = sapo_load(lp, at);
  v[1] = sapo_load(old, at);
  v[2] = sapo_load(adv, p.per_token_advantages ? at : row);
  v[3] = p.has_weights ? sapo_load(w, at) : 1.0f;
  v[4] = p.has_reference ? sapo_load(rf, at) : 0.0f;
  for (int k = 0; k < 5; ++k) {
    x.bad[k] = keep && !sapo_isfinite(v[k]) ? 1 : 0;
    v[k] = keep ? v[k] : 0.0f;
  }
  x.keep = ind(keep);
  x.lp = v[0]; x.old = v[1]; x.adv = v[2]; x.w = v[3]; x.rf = v[4];
  x.flag = p.has_flags && keep ? sapo_load(flags, at) : 0.0f;
  return x;
}

template <typename F, typename M>
SAPO_INLINE void policy_prepass(SapoThread th, SAPO_GLOBAL const F* lp, SAPO_GLOBAL const F* old,
                                SAPO_GLOBAL const F* adv, SAPO_GLOBAL const M* mask,
                                SAPO_GLOBAL const F* w, PolicyParams p,
                                SAPO_GLOBAL float* row_stats, SAPO_SHARED float* scratch) {
  const long row = th.block;
  const bool need = p.level != SAPO_LEVEL_TOKEN || shape_has_row_statistic(p);
  float acc[ROW_STATS] = {0.0f, 0.0f, 0.0f, 0.0f};  // n, invalid mask values, Σ m·y, Σ m·row_term
  for (long j = th.index; j < p.t; j += th.threads) {
    float m = sapo_load(mask, row * p.t + j);
    acc[0] += ind(m == 1.0f);
    acc[1] += ind(m != 0.0f && m != 1.0f);
    if (need) {
      Loaded x = load_token(p, row, j, lp, old, adv, mask, w, w, w);
      float delta = clamp_d(x.lp - x.old, -p.clamp, p.clamp).v;
      acc[2] += x.keep * shape_log_ratio(p, delta, x.adv).v;
      if (shape_has_row_statistic(p))
        acc[3] += x.keep * shape_row_term(p, delta, x.keep != 0.0f ? x.w : 1.0f);
    }
  }
  sapo_block_sum<ROW_STATS>(acc, scratch, th);
  if (th.index == 0)
    for (int k = 0; k < ROW_STATS; ++k) row_stats[row * ROW_STATS + k] = acc[k];
}

// Per-thread sums of `rows`.
#define ACC_P 0
#define ACC_SLOPE 1
#define ACC_K 2
#define ACC_KRAW 3
#define ACC_NEG_DELTA 4
#define ACC_EXCESS 5
#define ACC_M 6   // 4 shape metrics
#define ACC_BAD 10  // 5 counts
#define ACC_LEN 15

// What one token gives: its gradient without the `Sequence` level's row-shared part, and
// ∂y/∂ℓ, its share of that part.
struct Step { float g, factor; };

// One token: accumulates its sums and returns its `Step`.
SAPO_INLINE Step token_step(SAPO_THREAD const PolicyParams& p, Loaded x, SequenceRatio seq,
                            float coef_policy, float coef_kl, SAPO_THREAD float* acc,
                            SAPO_THREAD float& lo, SAPO_THREAD float& hi) {
  RatioTerms rt = ratio_terms(p, x.lp, x.old, x.adv, seq);
  Token t;
  t.lp = x.lp; t.old = x.old; t.delta = rt.delta; t.r = rt.r; t.a = x.adv; t.row = seq.row;
  t.flag = x.flag;
  Eval e = shape_eval(p, t);
  // cpu.rs, effective_weight: an objective may fold the weights into its own (VESPO).
  float weight = shape_weights_multiply(p) ? x.w : x.keep;
  float g = coef_policy * weight * (e.slope * rt.dr + e.direct);
  acc[ACC_P] += weight * e.value;
  acc[ACC_SLOPE] += weight * e.slope;
  acc[ACC_NEG_DELTA] += -(x.keep * rt.delta);
  acc[ACC_EXCESS] += x.keep * (rt.r - 1.0f);
  for (int k = 0; k < 4; ++k) acc[ACC_M + k] += x.keep * e.m[k];
  if (x.keep != 0.0f) {
    lo = rt.r < lo ? rt.r : lo;
    hi = rt.r > hi ? rt.r : hi;
  }
  if (p.kl) {  // cpu.rs, kl_terms
    float d = x.lp - x.rf;
    Pair k = kl_value_and_slope(p, d);
    float weight_kl = p.kl_importance ? rt.r : 1.0f;
    float dweight = p.kl_importance ? rt.dr : 0.0f;
    acc[ACC_K] += x.keep * k.v * weight_kl;
    acc[ACC_KRAW] += x.keep * k.v;
    // kl.rs, weighted_slope: unclamped k3's e^{-d} cancelled in the formula.
    float slope_kl = weight_kl * k.d + k.v * dweight;
    if (p.kl_estimator == SAPO_KL_K3 && !sapo_isfinite(p.kl_bounds[0]) && weight_kl > 0.0f) {
      float c = dweight / weight_kl;
      slope_kl = weight_kl * ((1.0f - c) * k.d + c * d);
    }
    g += x.keep * coef_kl * slope_kl;
  }
  Step step;
  step.g = g;
  step.factor = rt.factor;
  return step;
}

// `totals_scratch`: 2·SAPO_MAX_WARPS; `scratch`: ACC_LEN·SAPO_MAX_WARPS.
template <typename F, typename M>
SAPO_INLINE void policy_rows(SapoThread th, SAPO_GLOBAL const F* lp, SAPO_GLOBAL const F* old,
                             SAPO_GLOBAL const F* adv, SAPO_GLOBAL const M* mask,
                             SAPO_GLOBAL const F* w, SAPO_GLOBAL const F* rf,
                             SAPO_GLOBAL const F* flags, PolicyParams p,
                             SAPO_GLOBAL const float* row_stats, SAPO_GLOBAL float* row_out,
                             SAPO_GLOBAL F* grad, SAPO_SHARED sapo_wide* totals_scratch,
                             SAPO_SHARED float* scratch) {
  const long row = th.block;
  // The batch's token and sequence counts: the same reduction in every block.
  sapo_wide totals[2] = {0.0, 0.0};
  for (long i = th.index; i < p.rows; i += th.threads) {
    float n_i = row_stats[i * ROW_STATS];
    totals[0] += (sapo_wide)n_i;
    totals[1] += n_i > 0.0f ? 1.0 : 0.0;
  }
  sapo_block_sum<2>(totals, totals_scratch, th);
  const float n = row_stats[row * ROW_STATS];
  const sapo_wide rows = (sapo_wide)p.rows;
  const sapo_wide c_policy = row_coefficient(p.policy_aggregation, n, totals[0], totals[1], rows);
  const sapo_wide kl_agg = p.kl ? row_coefficient(p.kl_aggregation, n, totals[0], totals[1], rows) : 0.0;
  const float coef_policy = (float)c_policy;
  const float coef_kl = (float)(p.kl ? (sapo_wide)p.kl_coef * kl_agg : 0.0);

  SequenceRatio seq;
  seq.s = 1.0f; seq.ds = 1.0f; seq.excess = 0.0f; seq.row = 0.0f;
  if (p.level != SAPO_LEVEL_TOKEN || shape_has_row_statistic(p)) {  // ratio.rs, sequence_log_ratio
    Pair log_s = clamp_d(row_stats[row * ROW_STATS + 2] / (n < 1.0f ? 1.0f : n), -SAPO_INF, p.seq_max);
    Pair s = ratio_d(log_s.v);
    seq.s = s.v;
    seq.ds = s.d * log_s.d;
    seq.excess = n * sapo_expm1(log_s.v < SAPO_MAX_EXP_ARG ? log_s.v : SAPO_MAX_EXP_ARG);  // saturating as the ratio
    seq.row = row_stats[row * ROW_STATS + 3];
  }
  const bool sequence = p.level == SAPO_LEVEL_SEQUENCE;
  float acc[ACC_LEN];
  for (int k = 0; k < ACC_LEN; ++k) acc[k] = 0.0f;
  float lo = SAPO_INF, hi = -SAPO_INF;
  for (long j = th.index; j < p.t; j += th.threads) {
    Loaded x = load_token(p, row, j, lp, old, adv, mask, w, rf, flags);
    for (int k = 0; k < 5; ++k) acc[ACC_BAD + k] += (float)x.bad[k];
    float g = token_step(p, x, seq, coef_policy, coef_kl, acc, lo, hi).g;
    if (!sequence) sapo_store(grad, row * p.t + j, g);
  }
  sapo_block_sum<ACC_LEN>(acc, scratch, th);
  sapo_block_min_max(lo, hi, scratch, th);
  if (sequence) {
    // Every token shares ∂l/∂s (importance-weighted KL: and Σ k·∂s), known only now.
    float kl_share = p.kl && p.kl_importance ? coef_kl * acc[ACC_KRAW] : 0.0f;
    float shared = (coef_policy * acc[ACC_SLOPE] + kl_share) * seq.ds / (n < 1.0f ? 1.0f : n);
    float unused[ACC_LEN] = {};  // the sums were taken in the first sweep
    float unused_lo = SAPO_INF, unused_hi = -SAPO_INF;
    for (long j = th.index; j < p.t; j += th.threads) {
      Loaded x = load_token(p, row, j, lp, old, adv, mask, w, rf, flags);
      Step step = token_step(p, x, seq, coef_policy, coef_kl, unused, unused_lo, unused_hi);
      sapo_store(grad, row * p.t + j, step.g + shared * x.keep * step.factor);
    }
  }
  if (th.index == 0) {
    SAPO_GLOBAL float* out = row_out + row * ROW_LEN;
    out[ROW_P] = acc[ACC_P];
    out[ROW_K] = acc[ACC_K];
    out[ROW_CP] = coef_policy;
    out[ROW_CK] = coef_kl;
    out[ROW_KA] = (float)kl_agg;
    for (int k = 0; k < SAPO_NUM_SLOTS; ++k) out[ROW_SUMS + k] = 0.0f;
    for (int k = 0; k < 4; ++k)
      if (p.slots[k] >= 0) out[ROW_SUMS + p.slots[k]] = acc[ACC_M + k];
    out[ROW_SUMS + SLOT_TOKENS] = n;
    out[ROW_SUMS + SLOT_NEG_LOG_RATIO] = acc[ACC_NEG_DELTA];
    out[ROW_SUMS + SLOT_RATIO_EXCESS] = p.level != SAPO_LEVEL_TOKEN ? seq.excess : acc[ACC_EXCESS];
    out[ROW_SUMS + SLOT_KL] = acc[ACC_K];
    out[ROW_MIN] = lo;
    out[ROW_MAX] = hi;
    for (int k = 0; k < 5; ++k) out[ROW_BAD + k] = acc[ACC_BAD + k];
  }
}

// The rows in order into `[loss, sums (16), min, max, invalid mask, non-finite ℓ, ℓold, A, w,
// ℓref]`.
// `scratch`: (OUT_LEN − 2)·SAPO_MAX_WARPS; `extrema_scratch`: 2·SAPO_MAX_WARPS.
SAPO_INLINE void policy_reduce(SapoThread th, PolicyParams p, SAPO_GLOBAL const float* row_stats,
                               SAPO_GLOBAL const float* row_out, SAPO_GLOBAL float* out,
                               SAPO_SHARED sapo_wide* scratch,
                               SAPO_SHARED float* extrema_scratch) {
  sapo_wide acc[OUT_LEN - 2];  // loss, sums, checks
  for (int k = 0; k < OUT_LEN - 2; ++k) acc[k] = 0.0;
  float lo = SAPO_INF, hi = -SAPO_INF;
  for (long i = th.index; i < p.rows; i += th.threads) {
    SAPO_GLOBAL const float* r = row_out + i * ROW_LEN;
    acc[0] += (sapo_wide)r[ROW_CP] * (sapo_wide)r[ROW_P] + (sapo_wide)r[ROW_CK] * (sapo_wide)r[ROW_K];
    for (int k = 0; k < SAPO_NUM_SLOTS; ++k) acc[1 + k] += (sapo_wide)r[ROW_SUMS + k];
    acc[1 + SLOT_KL_LOSS] += (sapo_wide)r[ROW_KA] * (sapo_wide)r[ROW_K];
    acc[1 + SAPO_NUM_SLOTS] += (sapo_wide)row_stats[i * ROW_STATS + 1];
    for (int k = 0; k < 5; ++k) acc[2 + SAPO_NUM_SLOTS + k] += (sapo_wide)r[ROW_BAD + k];
    lo = r[ROW_MIN] < lo ? r[ROW_MIN] : lo;
    hi = r[ROW_MAX] > hi ? r[ROW_MAX] : hi;
  }
  sapo_block_sum<OUT_LEN - 2>(acc, scratch, th);
  sapo_block_min_max(lo, hi, extrema_scratch, th);
  if (th.index == 0) {
    out[0] = (float)acc[0];
    for (int k = 0; k < SAPO_NUM_SLOTS; ++k) out[1 + k] = (float)acc[1 + k];
    out[1 + SAPO_NUM_SLOTS] = lo;
    out[2 + SAPO_NUM_SLOTS] = hi;
    for (int k = 0; k < CHECKS; ++k) out[3 + SAPO_NUM_SLOTS + k] = (float)acc[1 + SAPO_NUM_SLOTS + k];
  }
}

// Every (log-probs, mask) storage pair, as `ENTRY(F, M, NAME)`: ℓ in f32, f16 or bf16; the mask
// in u8 or ℓ's type.
#define SAPO_POLICY_TYPES(ENTRY)          \
  ENTRY(float, unsigned char, f32_u8)     \
  ENTRY(float, float, f32_f32)            \
  ENTRY(F16, unsigned char, f16_u8)       \
  ENTRY(F16, F16, f16_f16)                \
  ENTRY(BF16, unsigned char, bf16_u8)     \
  ENTRY(BF16, BF16, bf16_bf16)
