// gate_family.rs: SAPO's soft trust region with the gate SAPO_GATE_* in shape_flag, τ_pos s0,
// τ_neg s1 (the gates' formulas: gate_family_value_and_weight, in kernels/policy_loss/token.h,
// from gate.rs). Metrics: the gate weight, the gate value.
#pragma once

SAPO_INLINE Eval gate_family_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  float tau = t.a > 0.0f ? s[0] : s[1];
  Pair g = gate_family_value_and_weight(t.r, tau, p.shape_flag);
  Eval e = through_ratio(-(g.v * t.a), -(t.a * g.d));
  e.m[0] = g.d; e.m[1] = g.v;
  return e;
}
