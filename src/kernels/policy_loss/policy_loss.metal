// The fused policy loss's Metal entry points; the kernels are `policy_loss.h`'s. Buffers in the
// order of the CUDA entry points (the constants `PolicyParams` by `set_bytes`), then the
// thread's place (`SAPO_METAL_PLACE`).
#include "policy_loss.h"

#define SAPO_POLICY_ENTRY(F, M, NAME)                                                            \
  kernel void sapo_policy_prepass_##NAME(                                                        \
      device const F* lp [[buffer(0)]], device const F* old [[buffer(1)]],                       \
      device const F* adv [[buffer(2)]], device const M* mask [[buffer(3)]],                     \
      device const F* w [[buffer(4)]], constant PolicyParams& params [[buffer(5)]],              \
      device float* row_stats [[buffer(6)]], SAPO_METAL_PLACE) {                                 \
    SAPO_SHARED_DECL float scratch[ROW_STATS * SAPO_MAX_WARPS];                                  \
    policy_prepass<F, M>(SAPO_METAL_THREAD, lp, old, adv, mask, w, params, row_stats, scratch);  \
  }                                                                                              \
  kernel void sapo_policy_rows_##NAME(                                                           \
      device const F* lp [[buffer(0)]], device const F* old [[buffer(1)]],                       \
      device const F* adv [[buffer(2)]], device const M* mask [[buffer(3)]],                     \
      device const F* w [[buffer(4)]], device const F* rf [[buffer(5)]],                         \
      device const F* flags [[buffer(6)]], constant PolicyParams& params [[buffer(7)]],          \
      device const float* row_stats [[buffer(8)]], device float* row_out [[buffer(9)]],          \
      device F* grad [[buffer(10)]], SAPO_METAL_PLACE) {                                         \
    SAPO_SHARED_DECL sapo_wide totals_scratch[2 * SAPO_MAX_WARPS];                               \
    SAPO_SHARED_DECL float scratch[ACC_LEN * SAPO_MAX_WARPS];                                    \
    policy_rows<F, M>(SAPO_METAL_THREAD, lp, old, adv, mask, w, rf, flags, params, row_stats,    \
                      row_out, grad, totals_scratch, scratch);                                   \
  }

SAPO_POLICY_TYPES(SAPO_POLICY_ENTRY)

kernel void sapo_policy_reduce(constant PolicyParams& params [[buffer(0)]],
                               device const float* row_stats [[buffer(1)]],
                               device const float* row_out [[buffer(2)]],
                               device float* out [[buffer(3)]], SAPO_METAL_PLACE) {
  SAPO_SHARED_DECL sapo_wide scratch[(OUT_LEN - 2) * SAPO_MAX_WARPS];
  SAPO_SHARED_DECL float extrema_scratch[2 * SAPO_MAX_WARPS];
  policy_reduce(SAPO_METAL_THREAD, params, row_stats, row_out, out, scratch, extrema_scratch);
}
