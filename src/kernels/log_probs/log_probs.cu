// The token log-probs' CUDA entry points; the kernels are `log_probs.h`'s.
#include "log_probs.h"

#define SAPO_LOG_PROBS_ENTRY(F, I, NAME)                                                      \
  extern "C" __global__ void sapo_log_probs_forward_##NAME(                                   \
      const F* logits, const I* targets, long vocab, float inv_t, long rows, float* out) {    \
    SAPO_SHARED_DECL float scratch[2 * SAPO_MAX_WARPS];                                       \
    log_probs_forward<F, I>(sapo_cuda_thread(), logits, targets, vocab, inv_t, rows, out,     \
                            scratch);                                                         \
  }                                                                                           \
  extern "C" __global__ void sapo_log_probs_backward_##NAME(                                  \
      const F* logits, const I* targets, long vocab, float inv_t, long rows, const float* res, \
      const float* grad_res, F* grad) {                                                        \
    log_probs_backward<F, I>(sapo_cuda_thread(), logits, targets, vocab, inv_t, rows, res,    \
                             grad_res, grad);                                                 \
  }

SAPO_LOG_PROBS_TYPES(SAPO_LOG_PROBS_ENTRY)
