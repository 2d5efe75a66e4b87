// clip.rs, ClipBounds: PPO's clip; low s0, high s1, delta s2, dual s3 (on: shape_flag).
// Metrics: clipped, dual-clipped, clipped below with A < 0, clipped above with A > 0.
#pragma once

SAPO_INLINE Eval clip_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  const float a = t.a, r = t.r;
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
