// The fused policy loss's CUDA entry points; the kernels are `policy_loss.h`'s.
#include "policy_loss.h"

#define SAPO_POLICY_ENTRY(F, M, NAME)                                                            \
  extern "C" __global__ void sapo_policy_prepass_##NAME(const F* lp, const F* old, const F* adv, \
                                                        const M* mask, const F* w,               \
                                                        PolicyParams p, float* row_stats) {      \
    SAPO_SHARED_DECL float scratch[ROW_STATS * SAPO_MAX_WARPS];                                  \
    policy_prepass<F, M>(sapo_cuda_thread(), lp, old, adv, mask, w, p, row_stats, scratch);      \
  }                                                                                              \
  extern "C" __global__ void sapo_policy_rows_##NAME(                                            \
      const F* lp, const F* old, const F* adv, const M* mask, const F* w, const F* rf,           \
      const F* flags, PolicyParams p, const float* row_stats, float* row_out, F* grad) {         \
    SAPO_SHARED_DECL sapo_wide totals_scratch[2 * SAPO_MAX_WARPS];                               \
    SAPO_SHARED_DECL float scratch[ACC_LEN * SAPO_MAX_WARPS];                                    \
    policy_rows<F, M>(sapo_cuda_thread(), lp, old, adv, mask, w, rf, flags, p, row_stats,        \
                      row_out, grad, totals_scratch, scratch);                                   \
  }

SAPO_POLICY_TYPES(SAPO_POLICY_ENTRY)

extern "C" __global__ void sapo_policy_reduce(PolicyParams p, const float* row_stats,
                                              const float* row_out, float* out) {
  SAPO_SHARED_DECL sapo_wide scratch[(OUT_LEN - 2) * SAPO_MAX_WARPS];
  SAPO_SHARED_DECL float extrema_scratch[2 * SAPO_MAX_WARPS];
  policy_reduce(sapo_cuda_thread(), p, row_stats, row_out, out, scratch, extrema_scratch);
}
