// topr.rs: l = −w·A·ℓ, w = w₊ (s0) on rows with score > 0 (flag 1), else w₋ (s1)·min(ρ, 1).
// Metric: the negative rows' tokens with ρ > 1 (truncated).
#pragma once

SAPO_INLINE Eval topr_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  bool positive = t.flag != 0.0f;
  float taper = t.r > 1.0f ? 1.0f : t.r;
  float weight = positive ? s[0] : s[1] * taper;
  Eval e = direct_only(-(weight * t.a * t.lp), -(weight * t.a));
  e.m[0] = ind(!positive && t.r > 1.0f);
  return e;
}
