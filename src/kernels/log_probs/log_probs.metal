// The token log-probs' Metal entry points; the kernels are `log_probs.h`'s. Buffers in the
// order of the CUDA entry points, then the thread's place (`SAPO_METAL_PLACE`).
#include "log_probs.h"

#define SAPO_LOG_PROBS_ENTRY(F, I, NAME)                                                        \
  kernel void sapo_log_probs_forward_##NAME(                                                    \
      device const F* logits [[buffer(0)]], device const I* targets [[buffer(1)]],             \
      constant long& vocab [[buffer(2)]], constant float& inv_t [[buffer(3)]],                  \
      constant long& rows [[buffer(4)]], device float* out [[buffer(5)]], SAPO_METAL_PLACE) {   \
    SAPO_SHARED_DECL float scratch[2 * SAPO_MAX_WARPS];                                         \
    log_probs_forward<F, I>(SAPO_METAL_THREAD, logits, targets, vocab, inv_t, rows, out,        \
                            scratch);                                                           \
  }                                                                                             \
  kernel void sapo_log_probs_backward_##NAME(                                                   \
      device const F* logits [[buffer(0)]], device const I* targets [[buffer(1)]],             \
      constant long& vocab [[buffer(2)]], constant float& inv_t [[buffer(3)]],                  \
      constant long& rows [[buffer(4)]], device const float* res [[buffer(5)]],                 \
      device const float* grad_res [[buffer(6)]], device F* grad [[buffer(7)]],                 \
      SAPO_METAL_PLACE) {                                                                       \
    log_probs_backward<F, I>(SAPO_METAL_THREAD, logits, targets, vocab, inv_t, rows, res,       \
                             grad_res, grad);                                                   \
  }

SAPO_LOG_PROBS_TYPES(SAPO_LOG_PROBS_ENTRY)
