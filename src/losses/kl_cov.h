// kl_cov.rs: l = −A·ρ + [t ∈ S]·κ·|ℓ − ℓold| (S: the flags); κ s0. Metric: |ℓ − ℓold|.
#pragma once

SAPO_INLINE Eval kl_cov_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  Pair abs = abs_d(t.lp - t.old);
  float penalty = t.flag * s[0];
  Eval e = through_ratio(-(t.a * t.r) + penalty * abs.v, -t.a);
  e.direct = penalty * abs.d;
  e.m[0] = abs.v;
  return e;
}
