// policy_gradient.rs: l = −A·ℓ.
#pragma once

SAPO_INLINE Eval policy_gradient_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  (void)p;
  return direct_only(-(t.a * t.lp), -t.a);
}
