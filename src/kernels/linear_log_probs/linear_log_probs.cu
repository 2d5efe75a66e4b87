// The fused linear path's CUDA entry points; the kernels are `linear_log_probs.h`'s.
#include "linear_log_probs.h"

extern "C" __global__ void sapo_linear_fold(const float* tile, const float* bias, int has_bias,
                                            long v0, long width, long row0,
                                            const sapo_i64* targets, float inv_t, float* state,
                                            float* z_target) {
  SAPO_SHARED_DECL float scratch[2 * SAPO_MAX_WARPS];
  linear_fold(sapo_cuda_thread(), tile, bias, has_bias, v0, width, row0, targets, inv_t, state,
              z_target, scratch);
}

extern "C" __global__ void sapo_linear_finish(const float* state, const float* z_target,
                                              long rows, float* out) {
  linear_finish(sapo_cuda_thread(), state, z_target, rows, out);
}

extern "C" __global__ void sapo_linear_grad_tile(float* tile, const float* bias, int has_bias,
                                                 long v0, long width, long row0, long rows,
                                                 const sapo_i64* targets, float inv_t,
                                                 const float* res, const float* grad_res) {
  linear_grad_tile(sapo_cuda_thread(), tile, bias, has_bias, v0, width, row0, rows, targets,
                   inv_t, res, grad_res);
}

extern "C" __global__ void sapo_linear_bias_grad(const float* tile, long chunk_rows, long width,
                                                 long v0, float* grad_bias) {
  linear_bias_grad(sapo_cuda_thread(), tile, chunk_rows, width, v0, grad_bias);
}
