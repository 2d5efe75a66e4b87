// Token log-probs and entropy on CUDA, forward and backward, one block per row of logits.
//
// Forward: each thread folds its strided share of the row into an online (max, Σe^{z−max},
// Σe^{z−max}·z); the block combines the threads' states in a fixed order (rescaled to the row's
// maximum), and thread 0 writes (ℓ, H, lse). A target id outside [0, V) makes the row's ℓ and H
// NaN (the policy loss then reports non-finite log-probs): the check needs no host read.
// Backward: the softmax recomputed on the fly, the logits' gradient written once.
//
// The scalar formulas restate those of `logprobs.rs` (`weighted_logit`, `finish_row`,
// `logit_gradient`); the tests run this file in simulation against the CPU kernel.
#include "../gpu/common.cuh"

// ---- logprobs.rs ----
__device__ __forceinline__ float weighted_logit(float e, float z) { return e > 0.0f ? e * z : 0.0f; }

__device__ __forceinline__ float logit_gradient(float x, float inv_t, float lse, float entropy,
                                                float grad_log_prob, float grad_entropy) {
  float z = x * inv_t;
  float p = expf(z - lse);
  float term = p > 0.0f ? p * (z - lse + entropy) : 0.0f;
  return -(inv_t * (grad_log_prob * p + grad_entropy * term));
}

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
  float max = -SAPO_INF, sum = 0.0f, weighted = 0.0f;
  for (long v = threadIdx.x; v < vocab; v += blockDim.x) {
    float z = sapo_load(x, v) * inv_t;
    if (z > max) {  // online maximum: rescale what was summed against the old one
      float scale = expf(max - z);
      sum *= scale;
      weighted *= scale;
      max = z;
    }
    if (max > -SAPO_INF) {
      float e = expf(z - max);
      sum += e;
      weighted += weighted_logit(e, z);
    }
  }
  // The row's maximum, then every thread's sums rescaled to it, summed in a fixed order.
  float lo = max, row_max = max;
  sapo_block_min_max(lo, row_max, scratch);
  float scale = max > -SAPO_INF ? expf(max - row_max) : 0.0f;
  float sums[2] = {sum * scale, weighted * scale};
  sapo_block_sum<2>(sums, scratch);
  if (threadIdx.x == 0) {
    long long target = target_id(targets, row);
    bool valid = target >= 0 && target < vocab;
    // logprobs.rs, finish_row.
    float lse = row_max + logf(sums[0]);
    float lp = SAPO_NAN, entropy = SAPO_NAN;
    if (sapo_isfinite(lse) && valid) {
      lp = sapo_load(x, (long)target) * inv_t - lse;
      entropy = lse - sums[1] / sums[0];
    }
    out[row] = lp;
    out[rows + row] = entropy;
    out[2 * rows + row] = lse;
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
