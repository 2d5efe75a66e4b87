// The token as the objectives' device functions see it (`losses/objective.rs`: Token, Eval)
// and the scalar formulas they and the traversal share, restated one to one from the crate's
// math files (named in each section); the tests run them in simulation against the CPU kernel.
// After `../gpu/common.h` and the generated `contract.h`.
#pragma once

#include "../gpu/common.h"
#include "contract.h"

struct Pair { float v, d; };

// ---- piecewise.rs ----
SAPO_INLINE Pair clamp_d(float x, float lo, float hi) {
  Pair p;
  p.v = x < lo ? lo : (x > hi ? hi : x);
  p.d = (x > lo && x < hi) ? 1.0f : 0.0f;
  return p;
}
SAPO_INLINE Pair abs_d(float x) {
  Pair p;
  p.v = x < 0.0f ? -x : x;
  p.d = x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
  return p;
}
SAPO_INLINE float ind(bool c) { return c ? 1.0f : 0.0f; }

// ---- ratio.rs ----
SAPO_INLINE Pair ratio_d(float x) {
  Pair c = clamp_d(x, -SAPO_INF, SAPO_MAX_EXP_ARG);
  Pair r;
  r.v = sapo_exp(c.v);
  r.d = r.v * c.d;
  return r;
}

// ---- gate.rs ----
SAPO_INLINE Pair gate_value_and_weight(float rho, float tau) {
  float x = tau * (rho - 1.0f);
  float e = sapo_exp(-(x < 0.0f ? -x : x));
  float big = 1.0f / (1.0f + e);
  float small = e * big;
  bool up = x >= 0.0f;
  float p = up ? big : small, q = up ? small : big;
  Pair out;
  out.v = p * (4.0f / tau);
  out.d = 4.0f * p * q;
  return out;
}

// The gate family (GateFunction::value_and_weight), u = τ(ρ − 1)/2.
SAPO_INLINE Pair gate_family_value_and_weight(float rho, float tau, int gate) {
  if (gate == SAPO_GATE_SIGMOID) return gate_value_and_weight(rho, tau);
  float u = 0.5f * tau * (rho - 1.0f);
  float base = 2.0f / tau;
  Pair out;
  if (gate == SAPO_GATE_ERF) {
    float u2 = u * u;
    out.v = base + (1.77245385090551603f / tau) * sapo_erf(u);
    out.d = u2 < SAPO_MAX_EXP_ARG ? sapo_exp(-u2) : 0.0f;
  } else if (gate == SAPO_GATE_ARCTAN) {
    out.v = base * (1.0f + sapo_atan(u));
    out.d = 1.0f / (1.0f + u * u);
  } else {
    float s = 1.0f / (1.0f + (u < 0.0f ? -u : u));
    out.v = base * (1.0f + u * s);
    out.d = s * s;
  }
  return out;
}

// ---- kl.rs ----
SAPO_INLINE Pair kl_value_and_slope(SAPO_THREAD const PolicyParams& p, float d) {
  Pair out;
  switch (p.kl_estimator) {
    case SAPO_KL_K1: out.v = d; out.d = 1.0f; return out;
    case SAPO_KL_ABS: return abs_d(d);
    case SAPO_KL_K2: out.v = 0.5f * d * d; out.d = d; return out;
    default: {
      float c1 = p.kl_bounds[0], c2 = p.kl_bounds[1];
      Pair neg = clamp_d(-d, -c1, c1);
      float e = sapo_exp(neg.v);
      Pair value = clamp_d(e - neg.v - 1.0f, -c2, c2);
      out.v = value.v;
      out.d = p.kl_estimator == SAPO_KL_K3 ? (1.0f - e) * neg.d * value.d : d;
      return out;
    }
  }
}

// ---- losses/objective.rs ----
struct Token { float lp, old, delta, r, a, row, flag; };
struct Eval { float value, slope, direct, m[4]; };

SAPO_INLINE Eval through_ratio(float value, float slope) {
  Eval e;
  e.value = value; e.slope = slope; e.direct = 0.0f;
  e.m[0] = e.m[1] = e.m[2] = e.m[3] = 0.0f;
  return e;
}
SAPO_INLINE Eval direct_only(float value, float direct) {
  Eval e = through_ratio(value, 0.0f);
  e.direct = direct;
  return e;
}
