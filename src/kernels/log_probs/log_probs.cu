// Token log-probs and entropy on CUDA, forward and backward, one block per row of logits.
//
// Forward: each thread folds its strided share of the row into an online (max, Σe^{z−max},
// Σe^{z−max}·z); the block combines the threads' states in a fixed order (rescaled to the row's
// maximum), and thread 0 writes (ℓ, H, lse). A target id outside [0, V) makes the row's ℓ and H
// NaN (the policy loss then reports non-finite log-probs): the check needs no host read.
// Backward: the softmax recomputed on the fly, the logits' gradient written once.
//
// The scalar formulas (`logprobs.rs`) and the online softmax are in `../gpu/softmax.cuh`, shared
// with the fused linear path; the tests run this file in simulation against the CPU kernel.
#include "../gpu/softmax.cuh"

// The target id of row `i` as a signed 64-bit value.
template <typename I> __device__ __forceinline__ long long target_id(const I* targets, long i) {
  return (long long)targets[i];
}

template <typename F, typename I>
__device__ void log_probs_forward(const F* logits, const I* targets, long vocab, float inv_t,
                                  long rows, float* out) {
  __shared__ float scratch[3 * (SAPO_MAX_BLOCK / SAPO_WARP)];
  const long row = blockIdx.x;
  const F* x = logits + row * vocab;
  OnlineSoftmax state = online_empty();
  for (long v = threadIdx.x; v < vocab; v += blockDim.x) online_add(state, sapo_load(x, v) * inv_t);
  state = online_block_combine(state, scratch);
  if (threadIdx.x == 0) {
    long long target = target_id(targets, row);
    bool valid = target >= 0 && target < vocab;
    RowLogProb r = finish_row(state, valid ? sapo_load(x, (long)target) * inv_t : SAPO_NAN);
    out[row] = r.log_prob;
    out[rows + row] = r.entropy;
    out[2 * rows + row] = r.lse;
  }
}

template <typename F, typename I>
__device__ void log_probs_backward(const F* logits, const I* targets, long vocab, float inv_t,
                                   long rows, const float* res, const float* grad_res, F* grad) {
  const long row = blockIdx.x;
  const F* x = logits + row * vocab;
  F* g = grad + row * vocab;
  float lse = res[2 * rows + row], entropy = res[rows + row];
  float g_lp = grad_res[row], g_h = grad_res[rows + row];
  long long target = target_id(targets, row);
  // A silent row (no upstream gradient, or garbage) gets zeros.
  bool silent = (g_lp == 0.0f && g_h == 0.0f) || !sapo_isfinite(lse);
  for (long v = threadIdx.x; v < vocab; v += blockDim.x) {
    float value = 0.0f;
    if (!silent) {
      value = logit_gradient(sapo_load(x, v), inv_t, lse, entropy, g_lp, g_h);
      if (v == target) value += inv_t * g_lp;
    }
    g[v] = Storage<F>::store(value);
  }
}

#define SAPO_LOG_PROBS_ENTRY(F, I, NAME)                                                      \
  extern "C" __global__ void sapo_log_probs_forward_##NAME(                                   \
      const F* logits, const I* targets, long vocab, float inv_t, long rows, float* out) {    \
    log_probs_forward<F, I>(logits, targets, vocab, inv_t, rows, out);                        \
  }                                                                                           \
  extern "C" __global__ void sapo_log_probs_backward_##NAME(                                  \
      const F* logits, const I* targets, long vocab, float inv_t, long rows, const float* res, \
      const float* grad_res, F* grad) {                                                        \
    log_probs_backward<F, I>(logits, targets, vocab, inv_t, rows, res, grad_res, grad);       \
  }

SAPO_LOG_PROBS_ENTRY(float, unsigned char, f32_u8)
SAPO_LOG_PROBS_ENTRY(float, unsigned int, f32_u32)
SAPO_LOG_PROBS_ENTRY(float, long long, f32_i64)
SAPO_LOG_PROBS_ENTRY(F16, unsigned char, f16_u8)
SAPO_LOG_PROBS_ENTRY(F16, unsigned int, f16_u32)
SAPO_LOG_PROBS_ENTRY(F16, long long, f16_i64)
SAPO_LOG_PROBS_ENTRY(BF16, unsigned char, bf16_u8)
SAPO_LOG_PROBS_ENTRY(BF16, unsigned int, bf16_u32)
SAPO_LOG_PROBS_ENTRY(BF16, long long, bf16_i64)
