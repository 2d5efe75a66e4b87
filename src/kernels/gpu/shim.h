// A CPU stand-in for the CUDA and Metal execution models, so that the very `.cu` and `.metal`
// sources sapo ships compile with g++ and run in tests (under ThreadSanitizer in CI). Include it
// before a `.cu` file, or with `SAPO_METAL` defined before a `.metal` file
// (`SAPO_SIM_SIMD_WIDTH`: the SIMD-group width to simulate, 32 unless given).
//
// One std::thread per GPU thread; the blocks of a grid run one after another (a block's shared
// memory, a function-local `static`, is therefore private to the running block);
// `__syncthreads` / `threadgroup_barrier` is a std::barrier over the block; warp / SIMD-group
// shuffles exchange values through per-warp slots and a warp barrier, so every lane of a warp
// must take part (sapo's kernels only use full-warp shuffles). A Metal entry point gets
// its place (`SAPO_METAL_PLACE`) as its last four arguments. This finds indexing, reduction and
// synchronisation errors; it does not model timing, nor find PTX- or MSL-only compile errors.
#pragma once

#include <barrier>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

namespace sapo_sim {
#ifdef SAPO_METAL
#ifndef SAPO_SIM_SIMD_WIDTH
#define SAPO_SIM_SIMD_WIDTH 32
#endif
constexpr unsigned simd_width = SAPO_SIM_SIMD_WIDTH;
static_assert(simd_width == 8 || simd_width == 16 || simd_width == 32, "SIMD width 8, 16 or 32");
#else
constexpr unsigned simd_width = 32;
#endif

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  // Two sets of slots, used in turn by successive shuffles: a lane writes one set only after
  // the barrier of the next shuffle, which every lane reaches after reading it.
  uint64_t slot[2][32];
};
struct Block {
  explicit Block(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline thread_local Block* block = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;
inline thread_local unsigned shuffles = 0;

inline void barrier() { block->barrier.arrive_and_wait(); }

// Lane `lane ^ lane_mask`'s value of `v`: every lane of the warp takes part.
template <typename T> T shuffle_xor(T v, unsigned lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  Warp& w = *warp;
  uint64_t* slot = w.slot[shuffles++ % 2];
  std::memcpy(&slot[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &slot[lane ^ lane_mask], sizeof(T));
  return out;
}

template <typename To, typename From> To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
  To out;
  std::memcpy(&out, &x, sizeof(To));
  return out;
}
}  // namespace sapo_sim


namespace sapo_sim {
// The host threads that play the GPU threads, created once per process (thread creation is what
// costs most under ThreadSanitizer) and handed one launch at a time.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }
  // Runs `job(t)` for t in [0, threads) on threads of their own; returns when all are done.
  void run(unsigned threads, std::function<void(unsigned)> job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < threads) {
      unsigned index = workers_.size();
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = std::move(job);
    active_ = threads;
    pending_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void work(unsigned index) {
    unsigned long seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (index >= active_) continue;
      std::function<void(unsigned)> job = job_;
      lock.unlock();
      job(index);
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  std::function<void(unsigned)> job_;
  unsigned active_ = 0, pending_ = 0;
  unsigned long generation_ = 0;
  bool stop_ = false;
};
inline Pool pool;

#ifndef SAPO_METAL
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
#endif

// Runs `kernel(args...)` on a grid of `grid` blocks of `threads` threads (1-D launches; threads a
// multiple of 32), on Metal with the thread's place appended to the arguments. Each GPU thread
// runs the blocks one after another, with a block barrier between two blocks (the next block
// reuses the shared memory).
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned threads, Kernel kernel, Args... args) {
  if (threads == 0 || threads % 32 != 0 || threads > 1024)
    throw std::runtime_error("block size must be a multiple of 32, at most 1024");
  Block blk(threads);
  for (unsigned w = 0; w < threads / simd_width; ++w)
    blk.warps.push_back(std::make_unique<Warp>(simd_width));
  pool.run(threads, [&](unsigned t) {
    block = &blk;
    warp = blk.warps[t / simd_width].get();
    lane = t % simd_width;
    shuffles = 0;
#ifndef SAPO_METAL
    threadIdx.x = t;
    blockDim.x = threads;
    gridDim.x = grid;
#endif
    for (unsigned b = 0; b < grid; ++b) {
#ifdef SAPO_METAL
      kernel(args..., t, b, threads, simd_width);
#else
      blockIdx.x = b;
      kernel(args...);
#endif
      blk.barrier.arrive_and_wait();
    }
  });
}
}  // namespace sapo_sim

#ifdef SAPO_METAL
// ---- The Metal side: the MSL built-ins and keywords sapo's kernels use. ----
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { sapo_sim::barrier(); }
template <typename T> T simd_shuffle_xor(T v, ushort mask) { return sapo_sim::shuffle_xor(v, mask); }
template <typename To, typename From> To as_type(From x) { return sapo_sim::bit_cast<To>(x); }
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float atan(float x) { return std::atan(x); }
}  // namespace precise
// Address spaces are plain C++ here; threadgroup arrays are shared by the block's threads.
#define kernel
#define device
#define constant const
#define thread
#define threadgroup
#define SAPO_SHARED_DECL static
#else
// ---- The CUDA side. ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
using sapo_sim::blockDim;
using sapo_sim::blockIdx;
using sapo_sim::gridDim;
using sapo_sim::threadIdx;
inline void __syncthreads() { sapo_sim::barrier(); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return sapo_sim::shuffle_xor(v, (unsigned)lane_mask);
}
inline float __uint_as_float(unsigned x) { return sapo_sim::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return sapo_sim::bit_cast<unsigned>(x); }
#endif
