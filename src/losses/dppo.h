// dppo.rs: l = −A·sg[min(ρ, C)]·ℓ·valid; low s0, high s1, cap s2, binary KL: shape_flag.
// Metrics: outside the trust region, capped.
#pragma once

// Whether the token lies inside the trust region.
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

SAPO_INLINE Eval dppo_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  const float a = t.a, r = t.r;
  float valid = ind(dppo_valid(p, t.lp, t.old, a));
  float weight = (r < s[2] ? r : s[2]) * valid;
  Eval e = direct_only(-(a * weight * t.lp), -(a * weight));
  e.m[0] = 1.0f - valid; e.m[1] = ind(r > s[2]) * valid;
  return e;
}
