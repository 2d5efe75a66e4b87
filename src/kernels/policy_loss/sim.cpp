// The policy loss's host sequence for the CPU simulation (tests only): the launches of `cuda.rs`,
// with buffers read from and written to files.
//
//   sim <input> <output>
//   input:  u32 dtype (0 f32, 1 f16, 2 bf16), u32 mask_u8, u32 sizeof(PolicyParams), the params,
//           then ℓ, ℓold, A, mask, [w], [ℓref], [flags] in their storage types
//   output: the f32 output (OUT_LEN), then the gradient in ℓ's storage type
#include "../gpu/shim.h"
#include "../gpu/sim_io.h"
#ifdef SAPO_METAL
// The Metal program as one string, as `metal.rs` hands it to Apple's compiler (`sim.rs`).
#include SAPO_SIM_METAL_SOURCE
#else
#include "policy_loss.cu"
#endif

using sapo_sim::take;

template <typename F, typename M, typename Prepass, typename Rows>
static void run(const PolicyParams& p, Prepass prepass, Rows rows, std::ofstream& out) {
  const size_t bt = (size_t)p.rows * p.t;
  std::vector<F> lp = take<F>(bt), old = take<F>(bt);
  std::vector<F> adv = take<F>(p.per_token_advantages ? bt : p.rows);
  std::vector<M> mask = take<M>(bt);
  std::vector<F> w = p.has_weights ? take<F>(bt) : lp;
  std::vector<F> rf = p.has_reference ? take<F>(bt) : lp;
  std::vector<F> flags = p.has_flags ? take<F>(bt) : lp;
  sapo_sim::expect_end();

  std::vector<float> row_stats((size_t)p.rows * ROW_STATS), row_out((size_t)p.rows * ROW_LEN);
  std::vector<float> result(OUT_LEN);
  std::vector<F> grad(bt);
  if (p.rows > 0) {
    sapo_sim::launch(p.rows, p.threads, prepass, lp.data(), old.data(), adv.data(), mask.data(),
                     w.data(), p, row_stats.data());
    sapo_sim::launch(p.rows, p.threads, rows, lp.data(), old.data(), adv.data(), mask.data(),
                     w.data(), rf.data(), flags.data(), p, (const float*)row_stats.data(),
                     row_out.data(), grad.data());
  }
  sapo_sim::launch(1, 256, sapo_policy_reduce, p, (const float*)row_stats.data(),
                   (const float*)row_out.data(), result.data());
  sapo_sim::write(out, result);
  sapo_sim::write(out, grad);
}

int main(int argc, char** argv) {
  if (!sapo_sim::read_input(argc, argv)) return 2;
  unsigned dtype = take<unsigned>(1)[0], mask_u8 = take<unsigned>(1)[0], size = take<unsigned>(1)[0];
  if (size != sizeof(PolicyParams)) {
    std::fprintf(stderr, "PolicyParams: %u bytes from Rust, %zu in C++\n", size, sizeof(PolicyParams));
    return 3;
  }
  PolicyParams p;
  std::memcpy(&p, take<char>(size).data(), size);
  std::ofstream out(argv[2], std::ios::binary);
  switch (dtype * 2 + (mask_u8 ? 0 : 1)) {
    case 0: run<float, unsigned char>(p, sapo_policy_prepass_f32_u8, sapo_policy_rows_f32_u8, out); break;
    case 1: run<float, float>(p, sapo_policy_prepass_f32_f32, sapo_policy_rows_f32_f32, out); break;
    case 2: run<F16, unsigned char>(p, sapo_policy_prepass_f16_u8, sapo_policy_rows_f16_u8, out); break;
    case 3: run<F16, F16>(p, sapo_policy_prepass_f16_f16, sapo_policy_rows_f16_f16, out); break;
    case 4: run<BF16, unsigned char>(p, sapo_policy_prepass_bf16_u8, sapo_policy_rows_bf16_u8, out); break;
    case 5: run<BF16, BF16>(p, sapo_policy_prepass_bf16_bf16, sapo_policy_rows_bf16_bf16, out); break;
    default: std::fprintf(stderr, "unknown dtype %u\n", dtype); return 2;
  }
  return 0;
}
