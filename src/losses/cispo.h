// cispo.rs: l = −sg[clip_w(ρ)]·A·ℓ; low s0, high s1.
// Metrics: clipped, clipped below with A < 0, clipped above with A > 0.
#pragma once

SAPO_INLINE Eval cispo_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  const float a = t.a, r = t.r;
  float weight = clamp_d(r, s[0], s[1]).v;
  bool below = r < s[0], above = r > s[1];
  Eval e = direct_only(-(weight * a * t.lp), -(weight * a));
  e.m[0] = ind(below || above); e.m[1] = ind(below && a < 0.0f); e.m[2] = ind(above && a > 0.0f);
  return e;
}
