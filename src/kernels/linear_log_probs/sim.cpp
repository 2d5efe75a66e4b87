// The fused linear log-probs' host sequence for the CPU simulation (tests only): the loop of
// `cuda.rs` / `metal.rs` over chunks of rows × tiles of the vocabulary, with a plain
// column-major GEMM in place of cuBLAS / MLX's (same products), and buffers read from and
// written to files.
//
//   sim <input> <output>
//   input:  u32 mode (0 forward, 1 backward), u32 has_bias, u32 threads, u32 0, i64 N, H, V,
//           chunk rows, tile width, f32 1/T, then hidden [N,H], weight [V,H], bias [V] (f32),
//           targets [N] (i64), and for the backward the packed [6,N] forward output and gradient
//   output: forward: [3,N]; backward: [N·H + V·H + V] (f32)
#include "../gpu/shim.h"
#include "../gpu/sim_io.h"
#ifdef SAPO_METAL
// The Metal program as one string, as `metal.rs` hands it to Apple's compiler (`sim.rs`).
#include SAPO_SIM_METAL_SOURCE
#else
#include "linear_log_probs.cu"
#endif

#include <algorithm>

using sapo_sim::take;

// cuBLAS's sgemm on column-major matrices: C = α·op(A)·op(B) + β·C.
static void gemm(bool ta, bool tb, long m, long n, long k, const float* a, long lda,
                 const float* b, long ldb, float beta, float* c, long ldc) {
  for (long j = 0; j < n; ++j)
    for (long i = 0; i < m; ++i) {
      float s = 0.0f;
      for (long l = 0; l < k; ++l) {
        float x = ta ? a[l + i * lda] : a[i + l * lda];
        float y = tb ? b[j + l * ldb] : b[l + j * ldb];
        s += x * y;
      }
      c[i + j * ldc] = s + (beta != 0.0f ? beta * c[i + j * ldc] : 0.0f);
    }
}

int main(int argc, char** argv) {
  if (!sapo_sim::read_input(argc, argv)) return 2;
  std::vector<unsigned> head = take<unsigned>(4);
  std::vector<long> dims = take<long>(5);
  const unsigned mode = head[0], threads = head[2];
  const int has_bias = (int)head[1];
  const long n = dims[0], h = dims[1], v = dims[2], chunk = dims[3], tile = dims[4];
  const float inv_t = take<float>(1)[0];
  std::vector<float> hidden = take<float>(n * h), weight = take<float>(v * h), bias = take<float>(v);
  std::vector<sapo_i64> targets = take<sapo_i64>(n);
  std::vector<float> packed = mode == 1 ? take<float>(6 * n) : std::vector<float>();
  sapo_sim::expect_end();
  std::vector<float> logits((size_t)std::min(chunk, n) * std::min(tile, v));
  // The walk of `cuda.rs`'s `for_each_tile`: each tile's logits, then `body(c0, c, v0, w)`.
  auto for_each_tile = [&](auto body) {
    for (long c0 = 0; c0 < n; c0 += chunk) {
      long c = std::min(chunk, n - c0);
      for (long v0 = 0; v0 < v; v0 += tile) {
        long w = std::min(tile, v - v0);
        gemm(true, false, w, c, h, weight.data() + v0 * h, h, hidden.data() + c0 * h, h, 0.0f,
             logits.data(), w);
        body(c0, c, v0, w);
      }
    }
  };
  std::vector<float> out;
  if (mode == 0) {
    std::vector<float> state(3 * n), z_target(n);
    for_each_tile([&](long c0, long c, long v0, long w) {
      sapo_sim::launch(c, threads, sapo_linear_fold, (const float*)logits.data(),
                       (const float*)bias.data(), has_bias, v0, w, c0,
                       (const sapo_i64*)targets.data(), inv_t, state.data(), z_target.data());
    });
    out.assign(3 * n, 0.0f);
    if (n > 0)
      sapo_sim::launch((n + 255) / 256, 256, sapo_linear_finish, (const float*)state.data(),
                       (const float*)z_target.data(), n, out.data());
  } else {
    out.assign(n * h + v * h + v, 0.0f);
    float *grad_hidden = out.data(), *grad_weight = out.data() + n * h,
          *grad_bias = out.data() + n * h + v * h;
    const float *res = packed.data(), *grad_res = packed.data() + 3 * n;
    std::vector<float> product((size_t)std::max(std::min(chunk, n), std::min(tile, v)) * h);
    for_each_tile([&](long c0, long c, long v0, long w) {
      sapo_sim::launch(c, threads, sapo_linear_grad_tile, logits.data(),
                       (const float*)bias.data(), has_bias, v0, w, c0, n,
                       (const sapo_i64*)targets.data(), inv_t, res, grad_res);
      if (has_bias)
        sapo_sim::launch((w + 255) / 256, 256, sapo_linear_bias_grad,
                         (const float*)logits.data(), c, w, v0, grad_bias);
#ifdef SAPO_METAL
      // metal.rs: MLX's GEMM writes each product, `sapo_linear_accumulate` adds it.
      gemm(false, false, h, c, w, weight.data() + v0 * h, h, logits.data(), w, 0.0f,
           product.data(), h);
      sapo_sim::launch((c * h + 255) / 256, 256, sapo_linear_accumulate, grad_hidden + c0 * h,
                       (const float*)product.data(), c * h);
      gemm(false, true, h, w, c, hidden.data() + c0 * h, h, logits.data(), w, 0.0f,
           product.data(), h);
      sapo_sim::launch((w * h + 255) / 256, 256, sapo_linear_accumulate, grad_weight + v0 * h,
                       (const float*)product.data(), w * h);
#else
      gemm(false, false, h, c, w, weight.data() + v0 * h, h, logits.data(), w, 1.0f,
           grad_hidden + c0 * h, h);
      gemm(false, true, h, w, c, hidden.data() + c0 * h, h, logits.data(), w, 1.0f,
           grad_weight + v0 * h, h);
#endif
    });
  }
  std::ofstream o(argv[2], std::ios::binary);
  sapo_sim::write(o, out);
  return 0;
}
