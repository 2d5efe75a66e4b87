// The policy loss's host sequence for the CPU simulation (tests only): the launches of `cuda.rs`,
// with buffers read from and written to files.
//
//   sim <input> <output>
//   input:  u32 dtype (0 f32, 1 f16, 2 bf16), u32 mask_u8, u32 sizeof(PolicyParams), the params,
//           then ℓ, ℓold, A, mask, [w], [ℓref], [flags] in their storage types
//   output: the f32 output (OUT_LEN), then the gradient in ℓ's storage type
#include "../gpu/shim.h"
#include "policy_loss.cu"

#include <cstdio>
#include <fstream>
#include <iterator>

static std::vector<char> input;
static size_t at = 0;

template <typename T> static const T* take(size_t n) {
  if (at + n * sizeof(T) > input.size()) throw std::runtime_error("input too short");
  const T* p = reinterpret_cast<const T*>(input.data() + at);
  at += n * sizeof(T);
  return p;
}

template <typename F, typename M, typename Prepass, typename Rows>
static void run(const PolicyParams& p, Prepass prepass, Rows rows, std::ofstream& out) {
  const size_t bt = (size_t)p.rows * p.t;
  // Copies, so that every buffer is suitably aligned.
  auto copy = [](const F* src, size_t n) { return std::vector<F>(src, src + n); };
  std::vector<F> lp = copy(take<F>(bt), bt), old = copy(take<F>(bt), bt);
  size_t n_adv = p.per_token_advantages ? bt : p.rows;
  std::vector<F> adv = copy(take<F>(n_adv), n_adv);
  const M* mask_in = take<M>(bt);
  std::vector<M> mask(mask_in, mask_in + bt);
  std::vector<F> w = p.has_weights ? copy(take<F>(bt), bt) : lp;
  std::vector<F> rf = p.has_reference ? copy(take<F>(bt), bt) : lp;
  std::vector<F> flags = p.has_flags ? copy(take<F>(bt), bt) : lp;
  if (at != input.size()) throw std::runtime_error("input too long");

  std::vector<float> row_stats((size_t)p.rows * 4), row_out((size_t)p.rows * ROW_LEN);
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
  out.write(reinterpret_cast<const char*>(result.data()), result.size() * sizeof(float));
  out.write(reinterpret_cast<const char*>(grad.data()), grad.size() * sizeof(F));
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <input> <output>\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  input.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  unsigned dtype = *take<unsigned>(1), mask_u8 = *take<unsigned>(1), size = *take<unsigned>(1);
  if (size != sizeof(PolicyParams)) {
    std::fprintf(stderr, "PolicyParams: %u bytes from Rust, %zu in C++\n", size, sizeof(PolicyParams));
    return 3;
  }
  PolicyParams p;
  std::memcpy(&p, take<char>(size), size);
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
