// The tile kernels of the fused linear log-probs on the GPU (CUDA and Metal, see
// `../gpu/common.h`; entry points in `linear_log_probs.cu` and `linear_log_probs.metal`). The
// host (`cuda.rs`, `metal.rs`) walks chunks of rows × tiles of the vocabulary; a GEMM (cuBLAS,
// MLX's Metal GEMM) multiplies each tile's logits `L = h·Wᵀ` (f32) into a `[rows, tile]`
// buffer, never the whole `[N, V]`; these kernels then
//
//   forward:  fold the tile into each row's online (max, Σe^{z−max}, Σe^{z−max}·z) and pick the
//             target's logit (`sapo_linear_fold`), then finish (ℓ, H, lse) (`sapo_linear_finish`);
//   backward: overwrite the tile with the logits' gradient (`sapo_linear_grad_tile`) and add its
//             column sums to the bias gradient (`sapo_linear_bias_grad`); GEMMs then add the
//             tile's share to the hidden states' and the weight's gradients.
//
// Tiles and rows are visited in a fixed order, with no atomics: the same bits on every run. The
// formulas and the online softmax are those of `../gpu/softmax.h`, shared with `log_probs.h`;
// the tests run this file in simulation against the CPU kernel.
#pragma once

#include "../gpu/softmax.h"

// One block per row of the chunk. `tile` is `[rows_in_chunk, width]` row-major; the tile covers
// vocabulary ids [v0, v0 + width). `state` is `[N, 3]` (max, sum, weighted), `z_target` `[N]`.
// `scratch`: 2·SAPO_MAX_WARPS floats.
SAPO_INLINE void linear_fold(SapoThread th, SAPO_GLOBAL const float* tile,
                             SAPO_GLOBAL const float* bias, int has_bias, long v0, long width,
                             long row0, SAPO_GLOBAL const sapo_i64* targets, float inv_t,
                             SAPO_GLOBAL float* state, SAPO_GLOBAL float* z_target,
                             SAPO_SHARED float* scratch) {
  const long r = th.block, row = row0 + r;
  SAPO_GLOBAL const float* x = tile + r * width;
  OnlineSoftmax tile_state = online_empty();
  for (long j = th.index; j < width; j += th.threads)
    online_add(tile_state, (x[j] + (has_bias ? bias[v0 + j] : 0.0f)) * inv_t);
  tile_state = online_block_combine(tile_state, scratch, th);
  if (th.index == 0) {
    SAPO_GLOBAL float* s = state + 3 * row;
    if (v0 == 0) {
      s[0] = -SAPO_INF; s[1] = 0.0f; s[2] = 0.0f;
      z_target[row] = SAPO_NAN;  // stays NaN for an id outside [0, V)
    }
    // Merge the tile into the running state at the larger maximum.
    const float tile_max = tile_state.max;
    float m = tile_max > s[0] ? tile_max : s[0];
    if (m > -SAPO_INF) {
      float old_scale = s[0] > -SAPO_INF ? sapo_exp(s[0] - m) : 0.0f;
      float new_scale = tile_max > -SAPO_INF ? sapo_exp(tile_max - m) : 0.0f;
      s[1] = s[1] * old_scale + tile_state.sum * new_scale;
      s[2] = s[2] * old_scale + tile_state.weighted * new_scale;
      s[0] = m;
    }
    sapo_i64 target = targets[row];
    if (target >= v0 && target < v0 + width)
      z_target[row] = (x[target - v0] + (has_bias ? bias[target] : 0.0f)) * inv_t;
  }
}

// One thread per row: `out` is `[3, N]` (ℓ, H, lse), as `finish_row`.
SAPO_INLINE void linear_finish(SapoThread th, SAPO_GLOBAL const float* state,
                               SAPO_GLOBAL const float* z_target, long rows,
                               SAPO_GLOBAL float* out) {
  long row = (long)th.block * th.threads + th.index;
  if (row >= rows) return;
  OnlineSoftmax s;
  s.max = state[3 * row];
  s.sum = state[3 * row + 1];
  s.weighted = state[3 * row + 2];
  RowLogProb r = finish_row(s, z_target[row]);
  out[row] = r.log_prob;
  out[rows + row] = r.entropy;
  out[2 * rows + row] = r.lse;
}

// One block per row of the chunk: the tile's logits become their gradient, in place.
SAPO_INLINE void linear_grad_tile(SapoThread th, SAPO_GLOBAL float* tile,
                                  SAPO_GLOBAL const float* bias, int has_bias, long v0,
                                  long width, long row0, long rows,
                                  SAPO_GLOBAL const sapo_i64* targets, float inv_t,
                                  SAPO_GLOBAL const float* res,
                                  SAPO_GLOBAL const float* grad_res) {
  const long r = th.block, row = row0 + r;
  SAPO_GLOBAL float* x = tile + r * width;
  float lse = res[2 * rows + row], entropy = res[rows + row];
  float g_lp = grad_res[row], g_h = grad_res[rows + row];
  sapo_i64 target = targets[row];
  bool silent = (g_lp == 0.0f && g_h == 0.0f) || !sapo_isfinite(lse);
  for (long j = th.index; j < width; j += th.threads) {
    float value = 0.0f;
    if (!silent) {
      value = logit_gradient(x[j] + (has_bias ? bias[v0 + j] : 0.0f), inv_t, lse, entropy,
                                    g_lp, g_h);
      if (v0 + j == target) value += inv_t * g_lp;
    }
    x[j] = value;
  }
}

// One thread per column of the tile: adds the column's sum (rows in order) to the bias gradient.
SAPO_INLINE void linear_bias_grad(SapoThread th, SAPO_GLOBAL const float* tile, long chunk_rows,
                                  long width, long v0, SAPO_GLOBAL float* grad_bias) {
  long j = (long)th.block * th.threads + th.index;
  if (j >= width) return;
  float s = 0.0f;
  for (long r = 0; r < chunk_rows; ++r) s += tile[r * width + j];
  grad_bias[v0 + j] += s;
}

// One thread per element: dst[i] += src[i]. Metal's GEMM (MLX's) writes its product instead of
// adding it (cuBLAS's β = 1), so on Metal each tile's gradient products are added by this.
SAPO_INLINE void linear_accumulate(SapoThread th, SAPO_GLOBAL float* dst,
                                   SAPO_GLOBAL const float* src, long count) {
  long i = (long)th.block * th.threads + th.index;
  if (i < count) dst[i] += src[i];
}
