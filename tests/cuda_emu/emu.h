// Host emulation of the CUDA features kernels.cu uses, for testing its kernels without a
// GPU: every thread of a block is a coroutine (ucontext) scheduled round-robin, so
// __syncthreads and the warp shuffles are real barriers; blocks run one after another,
// __shared__ variables are function statics (one block lives at a time).
// Compile kernels.cu with: g++ -std=c++20 -include emu.h -x c++ kernels.cu launch.cpp
#pragma once
#define NORMCORE_HOST_EMULATION 1  // kernels.cu: software float16 conversions, no PTX
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Thread {
    ucontext_t ctx;
    dim3 tid;
    int linear = 0;
    bool done = false;
};
extern Thread* cur;
extern dim3 block, bdim, gdim;
void yield();
void sync_block();
void sync_warp();
extern double warp_buf[32][32];
}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::sync_block(); }

template <typename T> inline T __shfl_down_sync(unsigned, T v, int offset) {
    const int warp = emu::cur->linear / 32, lane = emu::cur->linear % 32;
    emu::warp_buf[warp][lane] = (double)v;
    emu::sync_warp();
    const T r = lane + offset < 32 ? (T)emu::warp_buf[warp][lane + offset] : v;
    emu::sync_warp();
    return r;
}

inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline double __longlong_as_double(long long u) { double f; std::memcpy(&f, &u, 8); return f; }
using std::fmax;
