// The emulator's scheduler and a C entry point that launches any kernel of kernels.cu by
// name. Every kernel parameter is a pointer or a 64-bit integer, so arguments travel as
// uint64 words and the kernel is called through a pointer of that shape (x86-64 / AArch64
// pass both kinds in the same integer registers).
#include <map>
#include <string>
#include <vector>

namespace emu {
Thread* cur = nullptr;
dim3 block, bdim, gdim;
double warp_buf[32][32];

static ucontext_t scheduler;
static std::vector<Thread> threads;
static std::vector<std::vector<char>> stacks;
static void (*entry)(void) = nullptr;
static int block_arrived = 0;
static unsigned long block_generation = 0;
static int warp_arrived[32];
static unsigned long warp_generation[32];

void yield() { swapcontext(&cur->ctx, &scheduler); }

void sync_block() {
    const unsigned long gen = block_generation;
    if (++block_arrived == (int)threads.size()) {
        block_arrived = 0;
        ++block_generation;
        return;
    }
    while (block_generation == gen) yield();
}

void sync_warp() {
    const int w = cur->linear / 32;
    const unsigned long gen = warp_generation[w];
    if (++warp_arrived[w] == 32) {
        warp_arrived[w] = 0;
        ++warp_generation[w];
        return;
    }
    while (warp_generation[w] == gen) yield();
}

static void run_thread() {
    entry();
    cur->done = true;
}  // returns to uc_link: the scheduler

static void run_block(unsigned bx, unsigned by) {
    const int n = (int)(bdim.x * bdim.y);
    threads.assign(n, Thread());
    if ((int)stacks.size() < n) stacks.resize(n, std::vector<char>(1 << 16));
    block.x = bx;
    block.y = by;
    block_arrived = 0;
    for (int w = 0; w < 32; ++w) warp_arrived[w] = 0;
    for (int i = 0; i < n; ++i) {
        Thread& t = threads[i];
        t.linear = i;
        t.tid.x = i % bdim.x;
        t.tid.y = i / bdim.x;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = stacks[i].data();
        t.ctx.uc_stack.ss_size = stacks[i].size();
        t.ctx.uc_link = &scheduler;
        makecontext(&t.ctx, run_thread, 0);
    }
    for (int live = n; live > 0;) {
        live = 0;
        for (auto& t : threads) {
            if (t.done) continue;
            cur = &t;
            swapcontext(&scheduler, &t.ctx);
            live += !t.done;
        }
    }
}
}  // namespace emu

typedef unsigned long long u64;
static const u64* g_args;
static void* g_kernel;
static int g_nargs;

template <int N> struct Call;
#define NC_CALL(N, ...)                                                     \
    template <> struct Call<N> {                                            \
        static void run() {                                                 \
            const u64* a = g_args;                                          \
            (void)a;                                                        \
            ((void (*)(__VA_ARGS__))g_kernel)(NC_ARGS_##N);                 \
        }                                                                   \
    };
#define U u64
#define NC_ARGS_7 a[0], a[1], a[2], a[3], a[4], a[5], a[6]
#define NC_ARGS_8 NC_ARGS_7, a[7]
#define NC_ARGS_9 NC_ARGS_8, a[8]
#define NC_ARGS_10 NC_ARGS_9, a[9]
#define NC_ARGS_11 NC_ARGS_10, a[10]
#define NC_ARGS_12 NC_ARGS_11, a[11]
#define NC_ARGS_13 NC_ARGS_12, a[12]
#define NC_ARGS_14 NC_ARGS_13, a[13]
#define NC_ARGS_15 NC_ARGS_14, a[14]
#define NC_ARGS_16 NC_ARGS_15, a[15]
NC_CALL(7, U, U, U, U, U, U, U)
NC_CALL(8, U, U, U, U, U, U, U, U)
NC_CALL(9, U, U, U, U, U, U, U, U, U)
NC_CALL(10, U, U, U, U, U, U, U, U, U, U)
NC_CALL(11, U, U, U, U, U, U, U, U, U, U, U)
NC_CALL(12, U, U, U, U, U, U, U, U, U, U, U, U)
NC_CALL(13, U, U, U, U, U, U, U, U, U, U, U, U, U)
NC_CALL(14, U, U, U, U, U, U, U, U, U, U, U, U, U, U)
NC_CALL(15, U, U, U, U, U, U, U, U, U, U, U, U, U, U, U)
NC_CALL(16, U, U, U, U, U, U, U, U, U, U, U, U, U, U, U, U)
#define NC_ARGS_4 a[0], a[1], a[2], a[3]
#define NC_ARGS_5 NC_ARGS_4, a[4]
#define NC_ARGS_6 NC_ARGS_5, a[5]
NC_CALL(4, U, U, U, U)
NC_CALL(5, U, U, U, U, U)
NC_CALL(6, U, U, U, U, U, U)

static void call_kernel() {
    switch (g_nargs) {
        case 4: Call<4>::run(); break;
        case 5: Call<5>::run(); break;
        case 6: Call<6>::run(); break;
        case 7: Call<7>::run(); break;
        case 8: Call<8>::run(); break;
        case 9: Call<9>::run(); break;
        case 10: Call<10>::run(); break;
        case 11: Call<11>::run(); break;
        case 12: Call<12>::run(); break;
        case 13: Call<13>::run(); break;
        case 14: Call<14>::run(); break;
        case 15: Call<15>::run(); break;
        case 16: Call<16>::run(); break;
    }
}

static std::map<std::string, void*> table() {
    std::map<std::string, void*> t;
#define NC_ENTRY(name, T, tag) t[#name "<" tag ">"] = (void*)&name<T>;
#define NC_ENTRIES(T, tag)                                                                         \
    NC_ENTRY(nc_moments_rows, T, tag) NC_ENTRY(nc_affine_rows, T, tag) NC_ENTRY(nc_sums_rows, T, tag) \
    NC_ENTRY(nc_dx_rows, T, tag) NC_ENTRY(nc_affine_inner, T, tag) NC_ENTRY(nc_row_sums_inner, T, tag) \
    NC_ENTRY(nc_param_sums_inner, T, tag) NC_ENTRY(nc_dx_inner, T, tag)                             \
    NC_ENTRY(nc_moments_cols, T, tag) NC_ENTRY(nc_sums_cols, T, tag) NC_ENTRY(nc_affine_cols, T, tag) \
    NC_ENTRY(nc_dx_cols, T, tag) NC_ENTRY(nc_normalize_groups, T, tag) NC_ENTRY(nc_add, T, tag)          \
    NC_ENTRY(nc_masked_moments_rows, T, tag) NC_ENTRY(nc_masked_moments_cols, T, tag)               \
    NC_ENTRY(nc_masked_dx_rows, T, tag) NC_ENTRY(nc_masked_dx_cols, T, tag) NC_ENTRY(nc_masked_dx_inner, T, tag)
    NC_ENTRIES(float, "float")
    NC_ENTRIES(double, "double")
    NC_ENTRIES(nc_f16, "nc_f16")
    NC_ENTRIES(nc_bf16, "nc_bf16")
    t["nc_combine_moments"] = (void*)&nc_combine_moments;
    return t;
}

extern "C" int nc_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned bx, unsigned by,
                             int nargs, const u64* args) {
    static const std::map<std::string, void*> kernels = table();
    auto it = kernels.find(name);
    if (it == kernels.end() || nargs < 4 || nargs > 16) return 1;
    g_kernel = it->second;
    g_args = args;
    g_nargs = nargs;
    emu::entry = call_kernel;
    emu::gdim.x = gx;
    emu::gdim.y = gy;
    emu::bdim.x = bx;
    emu::bdim.y = by;
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) emu::run_block(x, y);
    return 0;
}
