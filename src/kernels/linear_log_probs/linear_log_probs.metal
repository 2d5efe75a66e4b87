// The fused linear path's Metal entry points; the kernels are `linear_log_probs.h`'s. Buffers
// in the order of the CUDA entry points (scalars by `set_bytes`), then the thread's place
// (`SAPO_METAL_PLACE`).
#include "linear_log_probs.h"

kernel void sapo_linear_fold(device const float* tile [[buffer(0)]],
                             device const float* bias [[buffer(1)]],
                             constant int& has_bias [[buffer(2)]], constant long& v0 [[buffer(3)]],
                             constant long& width [[buffer(4)]], constant long& row0 [[buffer(5)]],
                             device const sapo_i64* targets [[buffer(6)]],
                             constant float& inv_t [[buffer(7)]], device float* state [[buffer(8)]],
                             device float* z_target [[buffer(9)]], SAPO_METAL_PLACE) {
  SAPO_SHARED_DECL float scratch[2 * SAPO_MAX_WARPS];
  linear_fold(SAPO_METAL_THREAD, tile, bias, has_bias, v0, width, row0, targets, inv_t, state,
              z_target, scratch);
}

kernel void sapo_linear_finish(device const float* state [[buffer(0)]],
                               device const float* z_target [[buffer(1)]],
                               constant long& rows [[buffer(2)]], device float* out [[buffer(3)]],
                               SAPO_METAL_PLACE) {
  linear_finish(SAPO_METAL_THREAD, state, z_target, rows, out);
}

kernel void sapo_linear_grad_tile(device float* tile [[buffer(0)]],
                                  device const float* bias [[buffer(1)]],
                                  constant int& has_bias [[buffer(2)]],
                                  constant long& v0 [[buffer(3)]],
                                  constant long& width [[buffer(4)]],
                                  constant long& row0 [[buffer(5)]],
                                  constant long& rows [[buffer(6)]],
                                  device const sapo_i64* targets [[buffer(7)]],
                                  constant float& inv_t [[buffer(8)]],
                                  device const float* res [[buffer(9)]],
                                  device const float* grad_res [[buffer(10)]], SAPO_METAL_PLACE) {
  linear_grad_tile(SAPO_METAL_THREAD, tile, bias, has_bias, v0, width, row0, rows, targets, inv_t,
                   res, grad_res);
}

kernel void sapo_linear_bias_grad(device const float* tile [[buffer(0)]],
                                  constant long& chunk_rows [[buffer(1)]],
                                  constant long& width [[buffer(2)]],
                                  constant long& v0 [[buffer(3)]],
                                  device float* grad_bias [[buffer(4)]], SAPO_METAL_PLACE) {
  linear_bias_grad(SAPO_METAL_THREAD, tile, chunk_rows, width, v0, grad_bias);
}

kernel void sapo_linear_accumulate(device float* dst [[buffer(0)]],
                                   device const float* src [[buffer(1)]],
                                   constant long& count [[buffer(2)]], SAPO_METAL_PLACE) {
  linear_accumulate(SAPO_METAL_THREAD, dst, src, count);
}
