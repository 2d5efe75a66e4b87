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
// The scalar formulas restate, one to one, the scalar forms of the crate's concept files (named in
// each section); the tests run this file in simulation against the CPU kernel, which runs those.
#pragma once

#include "../gpu/common.h"

// Mirrors `PolicyParams` in `gpu.rs` (#[repr(C)], 4-byte fields only).
struct AggregationParams {
  int batch;          // 0: none, 1: tokens, 2: sequences (rows with a token), 3: rows
  int row;            // 0: none, 1: the row's tokens, 2: `row_constant`
  float world;        // data-parallel world size
  float global;       // the global count replacing the local one; < 0: none
  float row_constant; // a fixed row divisor (the horizon)
};

struct PolicyParams {
  int rows, t, threads;
  int level;               // 0: token, 1: sequence, 2: sequence-token
  int shape;               // TrustRegion: 0 soft gate, 1 hard clip, 2 unclipped, 3 policy gradient,
                           // 4 CISPO, 5 DRO, 6 KL-Cov, 7 DPPO, 8 VESPO, 9 geometric clip
  int shape_flag;          // hard clip: dual clip on; DPPO: binary KL
  int per_token_advantages, has_weights, has_reference, has_flags;
  int kl, kl_estimator, kl_importance;  // estimator: 0 k1, 1 abs, 2 k2, 3 k3, 4 k3+
  int slots[4];            // the metric slot of each shape metric, −1: none
  float clamp;             // the log-ratio clamp c (+inf: none)
  float seq_max;           // the sequence log-ratio bound (+inf: none)
  float kl_coef;           // β
  float kl_bounds[2];      // k3's log-ratio and value bounds (+inf: unclamped)
  float shape_param[8];
  AggregationParams policy_aggregation, kl_aggregation;
};

#define SAPO_MAX_EXP_ARG 88.0f
#define SAPO_NUM_SLOTS 16
// Metric slots (`losses/metrics.rs`).
#define SLOT_TOKENS 0
#define SLOT_NEG_LOG_RATIO 1
#define SLOT_RATIO_EXCESS 2
#define SLOT_KL 9
#define SLOT_KL_LOSS 14
// Per-row record written by `rows`, read by `reduce`.
#define ROW_P 0        // Σ m·w·l
#define ROW_K 1        // Σ m·k̂
#define ROW_CP 2       // the policy coefficient
#define ROW_CK 3       // β × the KL coefficient
#define ROW_KA 4       // the KL coefficient
#define ROW_SUMS 5     // 16 metric sums
#define ROW_MIN 21
#define ROW_MAX 22
#define ROW_BAD 23     // 5 non-finite counts: ℓ, ℓold, A, w, ℓref
#define ROW_LEN 28
#define OUT_LEN (1 + SAPO_NUM_SLOTS + 2 + 6)

struct Pair { float v, d; };

// ---- piecewise.rs ----
SAPO_INLINE Pair clamp_d(float x, float lo, float hi) {
  Pair p;
  p.v = x < lo ? lo : (x > hi ? hi : x);
  p.d = (x > lo && x < hi) ? 1.0f : 0.0f;
  return p;
}
SAPO_INLINE Pair abs_d(float x) {
  Pair p;
  p.v = x < 0.0f ? -x : x;
  p.d = x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
  return p;
}
SAPO_INLINE float ind(bool c) { return c ? 1.0f : 0.0f; }

// ---- ratio.rs ----
SAPO_INLINE Pair ratio_d(float x) {
  Pair c = clamp_d(x, -SAPO_INF, SAPO_MAX_EXP_ARG);
  Pair r;
  r.v = sapo_exp(c.v);
  r.d = r.v * c.d;
  return r;
}

// ---- gate.rs ----
SAPO_INLINE Pair gate_value_and_weight(float rho, float tau) {
  float x = tau * (rho - 1.0f);
  float e = sapo_exp(-(x < 0.0f ? -x : x));
  float big = 1.0f / (1.0f + e);
  float small = e * big;
  bool up = x >= 0.0f;
  float p = up ? big : small, q = up ? small : big;
  Pair out;
  out.v = p * (4.0f / tau);
  out.d = 4.0f * p * q;
  return out;
}

// ---- kl.rs ----
SAPO_INLINE Pair kl_value_and_slope(SAPO_THREAD const PolicyParams& p, float d) {
  Pair out;
  switch (p.kl_estimator) {
    case 0: out.v = d; out.d = 1.0f; return out;
    case 1: return abs_d(d);
    case 2: out.v = 0.5f * d * d; out.d = d; return out;
    default: {
      float c1 = p.kl_bounds[0], c2 = p.kl_bounds[1];
      Pair neg = clamp_d(-d, -c1, c1);
      float e = sapo_exp(neg.v);
      Pair value = clamp_d(e - neg.v - 1.0f, -c2, c2);
      out.v = value.v;
      out.d = p.kl_estimator == 3 ? (1.0f - e) * neg.d * value.d : d;
      return out;
    }
  }
}

// ---- trust_region.rs and the shapes' files ----
struct Token { float lp, old, delta, r, a, row, flag; };
struct Eval { float value, slope, direct, m[4]; };

SAPO_INLINE Eval through_ratio(float value, float slope) {
  Eval e;
  e.value = value; e.slope = slope; e.direct = 0.0f;
  e.m[0] = e.m[1] = e.m[2] = e.m[3] = 0.0f;
  return e;
}
SAPO_INLINE Eval direct_only(float value, float direct) {
  Eval e = through_ratio(value, 0.0f);
  e.direct = direct;
  return e;
}

// gmpo.rs: the sign-aware clip of the log-ratio (identity for the other shapes).
SAPO_INLINE Pair shape_log_ratio(SAPO_THREAD const PolicyParams& p, float x, float a) {
  Pair out;
  out.v = x; out.d = 1.0f;
  if (p.shape != 9) return out;
  Pair c = clamp_d(x, p.shape_param[0], p.shape_param[1]);
  float take_clamp = a > 0.0f ? ind(c.v < x) : ind(c.v > x);
  if (x == c.v) { out.v = x; out.d = 0.5f * (1.0f + c.d); }
  else if (take_clamp != 0.0f) { out = c; }
  if (a == 0.0f) { out.v = 0.0f; out.d = 0.0f; }
  return out;
}

// vespo.rs: `clamp(ln w, ln 1e-8, 20)` (bounds in shape_param[6], [7]).
SAPO_INLINE float vespo_row_term(SAPO_THREAD const PolicyParams& p, float delta, float w) {
  return delta + clamp_d(sapo_log(w), p.shape_param[6], p.shape_param[7]).v;
}

// dppo.rs: whether the token lies inside the trust region.
SAPO_INLINE bool dppo_valid(SAPO_THREAD const PolicyParams& p, float lp, float old, float a) {
  float prob = sapo_exp(lp), prob_old = sapo_exp(old);
  bool positive = a > 0.0f;
  float low = p.shape_param[0], high = p.shape_param[1];
  if (p.shape_flag) {
    const float guard = 1e-8f;
    float d = prob_old * (old - lp) +
              (1.0f - prob_old) * sapo_log((1.0f - prob_old + guard) / (1.0f - prob + guard));
    return positive ? (d <= high || prob <= prob_old) : (d <= low || prob >= prob_old);
  }
  return positive ? prob - prob_old <= high : prob - prob_old >= -low;
}

SAPO_INLINE Eval shape_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  const float a = t.a, r = t.r;
  switch (p.shape) {
    case 0: {  // gate.rs, SoftGate
      float tau = a > 0.0f ? s[0] : s[1];
      Pair g = gate_value_and_weight(r, tau);
      Eval e = through_ratio(-(g.v * a), -(a * g.d));
      e.m[0] = g.d; e.m[1] = g.v;
      return e;
    }
    case 1: {  // clip.rs, ClipBounds: low s0, high s1, delta s2, dual s3
      Pair u = clamp_d(r, -SAPO_INF, s[2]);
      float l1 = -(a * u.v), d1 = -(a * u.d);
      Pair c = clamp_d(r, s[0], s[1]);
      float l2 = -(a * c.v), d2 = -(a * c.d);
      bool clipped = l2 > l1;
      float loss = clipped ? l2 : l1;
      float slope = l1 == l2 ? 0.5f * (d1 + d2) : (clipped ? d2 : d1);
      bool cut = false;
      if (p.shape_flag) {
        float floor = -(s[3] * a);
        bool negative = a < 0.0f;
        cut = negative && loss > floor;
        bool tie = negative && loss == floor;
        loss = cut ? floor : loss;
        slope = cut ? 0.0f : (tie ? 0.5f * slope : slope);
      }
      Eval e = through_ratio(loss, slope);
      e.m[0] = ind(clipped); e.m[1] = ind(cut);
      e.m[2] = ind(r < s[0] && a < 0.0f); e.m[3] = ind(r > s[1] && a > 0.0f);
      return e;
    }
    case 2: return through_ratio(-(a * r), -a);                  // trust_region.rs, Unclipped
    case 3: return direct_only(-(a * t.lp), -a);                 // trust_region.rs, PolicyGradient
    case 4: {  // cispo.rs: low s0, high s1
      float weight = clamp_d(r, s[0], s[1]).v;
      bool below = r < s[0], above = r > s[1];
      Eval e = direct_only(-(weight * a * t.lp), -(weight * a));
      e.m[0] = ind(below || above); e.m[1] = ind(below && a < 0.0f); e.m[2] = ind(above && a > 0.0f);
      return e;
    }
    case 5: {  // dro.rs: beta s0
      float d = t.lp - t.old;
      return direct_only(-(a * t.lp - 0.5f * s[0] * d * d), -(a - s[0] * d));
    }
    case 6: {  // kl_cov.rs: coef s0
      Pair abs = abs_d(t.lp - t.old);
      float penalty = t.flag * s[0];
      Eval e = through_ratio(-(a * r) + penalty * abs.v, -a);
      e.direct = penalty * abs.d;
      e.m[0] = abs.v;
      return e;
    }
    case 7: {  // dppo.rs: low s0, high s1, cap s2
      float valid = ind(dppo_valid(p, t.lp, t.old, a));
      float weight = (r < s[2] ? r : s[2]) * valid;
      Eval e = direct_only(-(a * weight * t.lp), -(a * weight));
      e.m[0] = 1.0f - valid; e.m[1] = ind(r > s[2]) * valid;
      return e;
    }
    case 8: {  // vespo.rs: k+ s0, λ+ s1, k− s2, λ− s3, log-weight bounds s4, s5
      float v = clamp_d(t.row, s[4], s[5]).v;
      bool positive = a >= 0.0f;
      float k = positive ? s[0] : s[2], lambda = positive ? s[1] : s[3];
      float arg = lambda + k * v - lambda * sapo_exp(v);
      float phi = arg < SAPO_MAX_EXP_ARG ? sapo_exp(arg) : 0.0f;
      return direct_only(-(phi * a * t.lp), -(phi * a));
    }
    default: {  // gmpo.rs, LogClip: low s0, high s1
      bool clipped = t.delta < s[0] || t.delta > s[1];
      Eval e = through_ratio(-(a * r), -a);
      e.m[0] = ind(clipped && a > 0.0f); e.m[1] = ind(clipped && a < 0.0f);
      return e;
    }
  }
}

// ---- aggregation.rs, `CoefficientParts::apply` ----
SAPO_INLINE sapo_wide row_coefficient(SAPO_THREAD const AggregationParams& g, sapo_wide n,
                                                  sapo_wide tokens, sapo_wide sequences, sapo_wide rows) {
  sapo_wide count = 1.0;
  if (g.batch == 1) count = tokens;
  if (g.batch == 2) count = sequences;
  if (g.batch == 3) count = rows;
  if (g.batch != 0 && g.global >= 0.0f) count = (sapo_wide)g.global;
  if (count < 1.0) count = 1.0;
  sapo_wide row = 1.0;
  if (g.row == 1) row = n < 1.0 ? 1.0 : n;
  if (g.row == 2) row = (sapo_wide)g.row_constant;
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
  out.r = p.level == 0 ? rho.v : seq.s;
  out.dr = p.level == 0 ? rho.d * out.factor : (p.level == 2 ? seq.ds : 0.0f);
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
  const bool need = p.level != 0 || p.shape == 8;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // n, invalid mask values, Σ m·y, Σ m·row_term
  for (long j = th.index; j < p.t; j += th.threads) {
    float m = sapo_load(mask, row * p.t + j);
    acc[0] += ind(m == 1.0f);
    acc[1] += ind(m != 0.0f && m != 1.0f);
    if (need) {
      Loaded x = load_token(p, row, j, lp, old, adv, mask, w, w, w);
      float delta = clamp_d(x.lp - x.old, -p.clamp, p.clamp).v;
      acc[2] += x.keep * shape_log_ratio(p, delta, x.adv).v;
      if (p.shape == 8) acc[3] += x.keep * vespo_row_term(p, delta, x.keep != 0.0f ? x.w : 1.0f);
    }
  }
  sapo_block_sum<4>(acc, scratch, th);
  if (th.index == 0)
    for (int k = 0; k < 4; ++k) row_stats[row * 4 + k] = acc[k];
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
  // cpu.rs, effective_weight: VESPO folds the weights into its sequence weight.
  float weight = p.shape == 8 ? x.keep : x.w;
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
    Pair k = kl_value_and_slope(p, x.lp - x.rf);
    float weight_kl = p.kl_importance ? rt.r : 1.0f;
    float dweight = p.kl_importance ? rt.dr : 0.0f;
    acc[ACC_K] += x.keep * k.v * weight_kl;
    acc[ACC_KRAW] += x.keep * k.v;
    g += x.keep * coef_kl * (weight_kl * k.d + k.v * dweight);
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
    float n_i = row_stats[i * 4];
    totals[0] += (sapo_wide)n_i;
    totals[1] += n_i > 0.0f ? 1.0 : 0.0;
  }
  sapo_block_sum<2>(totals, totals_scratch, th);
  const float n = row_stats[row * 4];
  const sapo_wide rows = (sapo_wide)p.rows;
  const sapo_wide c_policy = row_coefficient(p.policy_aggregation, n, totals[0], totals[1], rows);
  const sapo_wide kl_agg = p.kl ? row_coefficient(p.kl_aggregation, n, totals[0], totals[1], rows) : 0.0;
  const float coef_policy = (float)c_policy;
  const float coef_kl = (float)(p.kl ? (sapo_wide)p.kl_coef * kl_agg : 0.0);

  SequenceRatio seq;
  seq.s = 1.0f; seq.ds = 1.0f; seq.excess = 0.0f; seq.row = 0.0f;
  if (p.level != 0 || p.shape == 8) {  // ratio.rs, sequence_log_ratio
    Pair log_s = clamp_d(row_stats[row * 4 + 2] / (n < 1.0f ? 1.0f : n), -SAPO_INF, p.seq_max);
    Pair s = ratio_d(log_s.v);
    seq.s = s.v;
    seq.ds = s.d * log_s.d;
    seq.excess = n * sapo_expm1(log_s.v < SAPO_MAX_EXP_ARG ? log_s.v : SAPO_MAX_EXP_ARG);  // saturating as the ratio
    seq.row = row_stats[row * 4 + 3];
  }
  const bool sequence = p.level == 1;
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
    out[ROW_SUMS + SLOT_RATIO_EXCESS] = p.level != 0 ? seq.excess : acc[ACC_EXCESS];
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
    acc[1 + SAPO_NUM_SLOTS] += (sapo_wide)row_stats[i * 4 + 1];
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
    for (int k = 0; k < 6; ++k) out[3 + SAPO_NUM_SLOTS + k] = (float)acc[1 + SAPO_NUM_SLOTS + k];
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
