// soft_gate.rs: SAPO's gate, τ_pos s0, τ_neg s1 (the gate's formula: gate_value_and_weight, in
// kernels/policy_loss/token.h, from gate.rs). Metrics: the gate weight, the gate value.
#pragma once

SAPO_INLINE Eval soft_gate_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  SAPO_THREAD const float* s = p.shape_param;
  float tau = t.a > 0.0f ? s[0] : s[1];
  Pair g = gate_value_and_weight(t.r, tau);
  Eval e = through_ratio(-(g.v * t.a), -(t.a * g.d));
  e.m[0] = g.d; e.m[1] = g.v;
  return e;
}
