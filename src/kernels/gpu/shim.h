// A CPU stand-in for the CUDA execution model, so that the very `.cu` sources sapo ships compile
// with g++ and run in tests (under ThreadSanitizer in CI). Include it before a `.cu` file.
//
// One std::thread per GPU thread; the blocks of a grid run one after another (a block's shared
// memory, a function-local `static`, is therefore private to the running block); `__syncthreads`
// is a std::barrier over the block; warp shuffles exchange values through a per-warp buffer
// between two warp barriers, so every lane of a warp must take part (sapo's kernels only use
// full-warp shuffles). This finds indexing, reduction and synchronisation errors; it does not
// model timing or PTX-only compile errors.
#pragma once

#include <barrier>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace sapo_sim {
struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  uint64_t slot[32];
};
struct Block {
  explicit Block(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline thread_local Block* block = nullptr;
inline thread_local Warp* warp = nullptr;
}  // namespace sapo_sim

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { sapo_sim::block->barrier.arrive_and_wait(); }

template <typename T> T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  sapo_sim::Warp& w = *sapo_sim::warp;
  const int lane = threadIdx.x % 32;
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &w.slot[lane ^ lane_mask], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}

inline float sapo_bits_to_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned sapo_float_to_bits(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}


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

// Runs `kernel(args...)` on a grid of `grid` blocks of `threads` threads (1-D launches; threads a
// multiple of 32). Each GPU thread runs the blocks one after another, with a block barrier
// between two blocks (the next block reuses the shared memory).
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned threads, Kernel kernel, Args... args) {
  if (threads == 0 || threads % 32 != 0 || threads > 1024)
    throw std::runtime_error("block size must be a multiple of 32, at most 1024");
  Block blk(threads);
  for (unsigned w = 0; w < threads / 32; ++w) blk.warps.push_back(std::make_unique<Warp>(32));
  pool.run(threads, [&](unsigned t) {
    threadIdx.x = t;
    blockDim.x = threads;
    gridDim.x = grid;
    block = &blk;
    warp = blk.warps[t / 32].get();
    for (unsigned b = 0; b < grid; ++b) {
      blockIdx.x = b;
      kernel(args...);
      blk.barrier.arrive_and_wait();
    }
  });
}
}  // namespace sapo_sim
