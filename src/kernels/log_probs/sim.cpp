// The token log-probs' host sequence for the CPU simulation (tests only): the launches of
// `cuda.rs`, with buffers read from and written to files.
//
//   sim <input> <output>
//   input:  u32 mode (0 forward, 1 backward), u32 dtype (0 f32, 1 f16, 2 bf16), u32 target type
//           (0 u8, 1 u32, 2 i64), u32 threads, i64 rows, i64 vocab, f32 1/T, the logits, the
//           targets, and for the backward the forward's [3,N] output and its upstream gradient
//   output: forward: [3,N] f32; backward: the logits' gradient in their storage type
#include "../gpu/shim.h"
#include "../gpu/sim_io.h"
#ifdef SAPO_METAL
// The Metal program as one string, as `metal.rs` hands it to Apple's compiler (`sim.rs`).
#include SAPO_SIM_METAL_SOURCE
#else
#include "log_probs.cu"
#endif

using sapo_sim::take;

struct Header {
  unsigned mode, threads;
  long rows, vocab;
  float inv_t;
};

template <typename F, typename I, typename Fwd, typename Bwd>
static void run(const Header& h, Fwd forward, Bwd backward, std::ofstream& out) {
  std::vector<F> logits = take<F>((size_t)h.rows * h.vocab);
  std::vector<I> targets = take<I>(h.rows);
  if (h.mode == 0) {
    sapo_sim::expect_end();
    std::vector<float> result(3 * (size_t)h.rows);
    if (h.rows > 0)
      sapo_sim::launch(h.rows, h.threads, forward, (const F*)logits.data(),
                       (const I*)targets.data(), h.vocab, h.inv_t, h.rows, result.data());
    sapo_sim::write(out, result);
  } else {
    std::vector<float> res = take<float>(3 * (size_t)h.rows), grad_res = take<float>(3 * (size_t)h.rows);
    sapo_sim::expect_end();
    std::vector<F> grad((size_t)h.rows * h.vocab);
    if (h.rows > 0)
      sapo_sim::launch(h.rows, h.threads, backward, (const F*)logits.data(),
                       (const I*)targets.data(), h.vocab, h.inv_t, h.rows,
                       (const float*)res.data(), (const float*)grad_res.data(), grad.data());
    sapo_sim::write(out, grad);
  }
}

#define SAPO_RUN(F, I, NAME) \
  run<F, I>(h, sapo_log_probs_forward_##NAME, sapo_log_probs_backward_##NAME, out)

int main(int argc, char** argv) {
  if (!sapo_sim::read_input(argc, argv)) return 2;
  Header h;
  h.mode = take<unsigned>(1)[0];
  unsigned dtype = take<unsigned>(1)[0], target = take<unsigned>(1)[0];
  h.threads = take<unsigned>(1)[0];
  h.rows = take<long>(1)[0];
  h.vocab = take<long>(1)[0];
  h.inv_t = take<float>(1)[0];
  std::ofstream out(argv[2], std::ios::binary);
  switch (dtype * 3 + target) {
    case 0: SAPO_RUN(float, unsigned char, f32_u8); break;
    case 1: SAPO_RUN(float, unsigned int, f32_u32); break;
    case 2: SAPO_RUN(float, sapo_i64, f32_i64); break;
    case 3: SAPO_RUN(F16, unsigned char, f16_u8); break;
    case 4: SAPO_RUN(F16, unsigned int, f16_u32); break;
    case 5: SAPO_RUN(F16, sapo_i64, f16_i64); break;
    case 6: SAPO_RUN(BF16, unsigned char, bf16_u8); break;
    case 7: SAPO_RUN(BF16, unsigned int, bf16_u32); break;
    case 8: SAPO_RUN(BF16, sapo_i64, bf16_i64); break;
    default: std::fprintf(stderr, "unknown dtype %u / target type %u\n", dtype, target); return 2;
  }
  return 0;
}
