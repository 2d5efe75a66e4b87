// gmpo.rs, LogClip: GMPO's sign-aware clip of the log-ratio; low s0 (−ε_low), high s1.
// Metrics: clipped with A > 0, clipped with A < 0.
#pragma once

// `y` and ∂y/∂x: the clamp's value where it is the pessimistic one, ties split.
SAPO_INLINE Pair gmpo_log_ratio(SAPO_THREAD const PolicyParams& p, float x, float a) {
  Pair out;
  out.v = x; out.d = 1.0f;
  Pair c = clamp_d(x, p.shape_param[0], p.shape_param[1]);
  float take_clamp = a > 0.0f ? ind(c.v < x) : ind(c.v > x);
  if (x == c.v) { out.v = x; out.d = 0.5f * (1.0f + c.d); }
  else if (take_clamp != 0.0f) { out = c; }
  if (a == 0.0f) { out.v = 0.0f; out.d = 0.0f; }
  return out;
}

SAPO_INLINE Eval gmpo_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  bool clipped = t.delta < s[0] || t.delta > s[1];
  Eval e = through_ratio(-(t.a * t.r), -t.a);
  e.m[0] = ind(clipped && t.a > 0.0f); e.m[1] = ind(clipped && t.a < 0.0f);
  return e;
}
