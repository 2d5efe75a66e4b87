// vespo.rs: l = −sg[φ_i]·A·ℓ; k+ s0, λ+ s1, k− s2, λ− s3, the row statistic's bounds s4, s5,
// the log-weights' bounds s6, s7. The row statistic is Σ m·vespo_row_term.
#pragma once

// `δ + clamp(ln w, ln 1e-8, 20)`.
SAPO_INLINE float vespo_row_term(SAPO_THREAD const PolicyParams& p, float delta, float w) {
  return delta + clamp_d(sapo_log(w), p.shape_param[6], p.shape_param[7]).v;
}

SAPO_INLINE Eval vespo_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  const float a = t.a;
  float v = clamp_d(t.row, s[4], s[5]).v;
  bool positive = a >= 0.0f;
  float k = positive ? s[0] : s[2], lambda = positive ? s[1] : s[3];
  float arg = lambda + k * v - lambda * sapo_exp(v);
  float phi = arg < SAPO_MAX_EXP_ARG ? sapo_exp(arg) : 0.0f;
  return direct_only(-(phi * a * t.lp), -(phi * a));
}
