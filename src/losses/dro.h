// dro.rs: l = −(A·ℓ − ½β(ℓ − ℓold)²); β s0.
#pragma once

SAPO_INLINE Eval dro_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  float d = t.lp - t.old;
  return direct_only(-(t.a * t.lp - 0.5f * s[0] * d * d), -(t.a - s[0] * d));
}
