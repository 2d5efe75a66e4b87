// unclipped.rs: f(ρ) = ρ.
#pragma once

SAPO_INLINE Eval unclipped_eval(SAPO_THREAD const PolicyParams& p, Token t) {
  (void)p;
  return through_ratio(-(t.a * t.r), -t.a);
}
