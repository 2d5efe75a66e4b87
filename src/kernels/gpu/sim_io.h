// File input and output of the simulation drivers (`<op>/sim.cpp`, tests only): the input file is
// read whole, values are taken from it in order, and a driver checks it took everything.
#pragma once

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

namespace sapo_sim {
inline std::vector<char> input;
inline size_t input_at = 0;

// Reads argv[1] whole; false (after a usage line) without two arguments.
inline bool read_input(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <input> <output>\n", argv[0]);
    return false;
  }
  std::ifstream in(argv[1], std::ios::binary);
  input.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

// The next `n` values of type T (copied: every buffer is suitably aligned).
template <typename T> std::vector<T> take(size_t n) {
  if (input_at + n * sizeof(T) > input.size()) throw std::runtime_error("input too short");
  std::vector<T> out(n);
  if (n > 0) std::memcpy(out.data(), input.data() + input_at, n * sizeof(T));
  input_at += n * sizeof(T);
  return out;
}

inline void expect_end() {
  if (input_at != input.size()) throw std::runtime_error("input too long");
}

template <typename T> void write(std::ofstream& out, const std::vector<T>& values) {
  out.write(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}
}  // namespace sapo_sim
