// clip_cov.rs: PPO's clip (clip.h's clip_eval, its parameters: low s0, high s1, delta s2 = inf,
// no dual clip) times (1 − flag), the flag marking the tokens Clip-Cov drew.
// Metric: the drawn tokens (the fraction zeroed).
#pragma once

SAPO_INLINE Eval clip_cov_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  Eval e = clip_eval(p, t);
  float kept = 1.0f - t.flag;
  e.value = e.value * kept;
  e.slope = e.slope * kept;
  e.m[0] = t.flag; e.m[1] = 0.0f; e.m[2] = 0.0f; e.m[3] = 0.0f;
  return e;
}
