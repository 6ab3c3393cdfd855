// vk_emu runtime: the fiber scheduler that runs a CTA, the warp collectives, shared memory, launch
// checks, and the few CUDA runtime calls csrc/ makes. See vk_emu.h for the model.
//
// Fibers start on their own stacks through makecontext/swapcontext and then switch with
// _setjmp/_longjmp, which (unlike swapcontext) make no signal-mask system call: a CTA of attention
// switches millions of times. Fortified longjmp refuses to jump between stacks, hence the #undef.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "vk_emu.h"

namespace vk_emu {
namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kDefaultDynamicSmem = 48 << 10;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kStaticSmemLimit = 48 << 10;

enum class State { Runnable, AtBarrier, AtWarp, Done };
enum class Collective { None, Shuffle, Mma };

// What a lane brings to a warp collective, and what it takes away.
struct LaneSlot {
  Collective kind = Collective::None;
  unsigned mask = 0;
  int lane_mask = 0, width = 0;
  const char* instr = nullptr;
  uint32_t in = 0, out = 0;  // shuffle
  std::array<uint32_t, 4> a{};
  std::array<uint32_t, 2> b{};
  std::array<float, 4> c{}, d{};
};

struct Fiber {
  ucontext_t ctx;  // for the first start only
  jmp_buf env;     // where the fiber resumes
  bool started = false;
  std::unique_ptr<char[]> stack;
  uint3 tid;
  State state = State::Runnable;
  LaneSlot slot;
};

struct Config {
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  unsigned seed = 0;
  size_t max_dynamic_smem = 227 << 10;  // sm_90: 227 KiB per block
};

struct Emu {
  Config config;
  std::mt19937 rng;
  // The running launch and CTA.
  std::function<void()> body;
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;  // the context swapcontext saves when it starts a fiber (never resumed)
  jmp_buf scheduler_env;
  std::vector<unsigned char> dynamic_smem;
  std::vector<unsigned char> static_arena;
  size_t static_used = 0;
  std::map<int, size_t> static_sites;  // site -> offset in static_arena, this CTA
  std::map<const void*, size_t> max_dynamic_smem_attr;
  // Errors: the failure of this launch (aborts it), and the sticky last error for cudaGetLastError.
  std::string failure;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
};

Emu& emu() {
  static Emu e;
  return e;
}

// Ends the calling fiber's launch with `message`; never returns to the fiber.
[[noreturn]] void fail_in_fiber(const std::string& message) {
  Emu& e = emu();
  if (e.failure.empty()) e.failure = message;
  e.current->state = State::Done;
  _longjmp(e.scheduler_env, 1);  // an aborted launch never resumes its fibers
}

void fiber_entry() {
  Emu& e = emu();
  e.body();
  e.current->state = State::Done;
  _longjmp(e.scheduler_env, 1);
}

void yield_to_scheduler() {
  Emu& e = emu();
  if (_setjmp(e.current->env) == 0) _longjmp(e.scheduler_env, 1);
}

// Runs `f` until it yields, waits at a barrier, or exits.
void run_fiber(Fiber& f) {
  Emu& e = emu();
  e.current = &f;
  if (_setjmp(e.scheduler_env) == 0) {
    if (!f.started) {
      f.started = true;
      swapcontext(&e.scheduler, &f.ctx);
    } else {
      _longjmp(f.env, 1);
    }
  }
  e.current = nullptr;
}

std::string where(const Fiber& f);

// A kernel thread that touches memory it may not (the tests put inaccessible guard pages around
// their buffers) gets SIGSEGV/SIGBUS: the handler, installed only while a launch runs, ends the
// launch with the address, as a GPU would with an illegal-address error. Outside a kernel thread the
// signal goes to the handler that was there before.
struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
  Emu& e = emu();
  if (e.current == nullptr) {
    sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
    raise(sig);
    return;
  }
  char buf[96];
  std::snprintf(buf, sizeof buf, "invalid memory access at %p", info->si_addr);
  if (e.failure.empty()) e.failure = std::string(buf) + " by " + where(*e.current);
  e.current->state = State::Done;
  sigset_t set;  // the signal is blocked while its handler runs, and _longjmp does not restore masks
  sigemptyset(&set);
  sigaddset(&set, sig);
  sigprocmask(SIG_UNBLOCK, &set, nullptr);
  (void)uctx;
  _longjmp(e.scheduler_env, 1);
}

struct FaultHandlers {
  FaultHandlers() {
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    sigaction(SIGBUS, &sa, &previous_bus);
  }
  ~FaultHandlers() {
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
  }
};

std::string where(const Fiber& f) {
  const Emu& e = emu();
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", e.block_idx.x, e.block_idx.y, e.block_idx.z,
                f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

// The whole warp is at a collective: check it is the same one and carry it out.
void complete_warp(std::vector<Fiber*>& lanes) {
  Emu& e = emu();
  const LaneSlot& s0 = lanes[0]->slot;
  for (Fiber* f : lanes) {
    const LaneSlot& s = f->slot;
    if (s.kind != s0.kind || s.mask != s0.mask || s.lane_mask != s0.lane_mask || s.width != s0.width ||
        (s.instr && s0.instr && std::strcmp(s.instr, s0.instr) != 0)) {
      e.failure = "lanes of one warp met at different collectives (" + where(*lanes[0]) + " vs " + where(*f) + ")";
      return;
    }
  }
  if (s0.kind == Collective::Shuffle) {
    for (int l = 0; l < 32; ++l) {
      // The CUDA guide: source lane = lane ^ laneMask; a source in a later group of `width` lanes
      // returns the caller's own value.
      const int src = l ^ s0.lane_mask;
      const bool own = src > 31 || src / s0.width > l / s0.width;
      lanes[l]->slot.out = lanes[own ? l : src]->slot.in;
    }
  } else {  // Mma, m16n8k16, row.col, fp32 accumulators; the PTX ISA's "Matrix Fragments for mma.m16n8k16
            // with floating point type": g = lane / 4, t = lane % 4;
            //   A (16x16): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
            //   B (16x8, k x n): b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
            //   C, D (16x8): c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1); the low 16 bits of a
            //   register hold the element with the smaller column (A) or row (B) index.
    const bool bf16 = std::strstr(s0.instr, ".bf16.bf16.") != nullptr;
    auto half_at = [bf16](uint32_t reg, int hi) -> double {
      const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
      if (bf16) {
        __nv_bfloat16 v;
        std::memcpy(&v, &bits, 2);
        return __bfloat162float(v);
      }
      __half v;
      std::memcpy(&v, &bits, 2);
      return __half2float(v);
    };
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const LaneSlot& s = lanes[l]->slot;
      const int g = l / 4, t = l % 4;
      for (int hi = 0; hi < 2; ++hi) {
        A[g][2 * t + hi] = half_at(s.a[0], hi);
        A[g + 8][2 * t + hi] = half_at(s.a[1], hi);
        A[g][2 * t + 8 + hi] = half_at(s.a[2], hi);
        A[g + 8][2 * t + 8 + hi] = half_at(s.a[3], hi);
        B[2 * t + hi][g] = half_at(s.b[0], hi);
        B[2 * t + 8 + hi][g] = half_at(s.b[1], hi);
      }
      C[g][2 * t] = s.c[0];
      C[g][2 * t + 1] = s.c[1];
      C[g + 8][2 * t] = s.c[2];
      C[g + 8][2 * t + 1] = s.c[3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int i = 0; i < 4; ++i) {
        double acc = C[rows[i]][cols[i]];
        for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
        lanes[l]->slot.d[i] = static_cast<float>(acc);
      }
    }
  }
  for (Fiber* f : lanes) f->state = State::Runnable;
}

// A lane arrives at a warp collective; returns when the whole warp has carried it out.
void warp_collective(const LaneSlot& request) {
  Emu& e = emu();
  Fiber& f = *e.current;
  if (request.mask != 0xffffffffu) fail_in_fiber("warp collective with a partial mask (not emulated) at " + where(f));
  const unsigned threads = e.block.x * e.block.y * e.block.z;
  if (threads % 32 != 0) fail_in_fiber("full-mask warp collective in a block whose size is not a multiple of 32");
  f.slot = request;
  f.state = State::AtWarp;
  yield_to_scheduler();
  if (!e.failure.empty()) fail_in_fiber(e.failure);
}

unsigned block_size(const dim3& b) { return b.x * b.y * b.z; }

// Runs one CTA to completion (or to the launch's first failure).
void run_block() {
  Emu& e = emu();
  const unsigned n = block_size(e.block);
  if (e.fibers.size() < n) e.fibers.resize(n);
  std::fill(e.dynamic_smem.begin(), e.dynamic_smem.end(), 0xFF);
  std::fill(e.static_arena.begin(), e.static_arena.end(), 0xFF);
  e.static_sites.clear();
  e.static_used = 0;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = e.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.tid = make_uint3(i % e.block.x, (i / e.block.x) % e.block.y, i / (e.block.x * e.block.y));
    f.state = State::Runnable;
    f.started = false;
    f.slot = LaneSlot();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Warps run greedily: the first warp in the order runs until all its lanes wait at __syncthreads (or
  // exit), then the next, so between two barriers each warp sees every other warp either before or
  // after its whole share of that phase. Two orders (forward, reverse) then expose any shared-memory
  // dependency between warps that no __syncthreads protects; lanes run in the same direction.
  const unsigned warps = (n + 31) / 32;
  std::vector<unsigned> warp_order(warps), lane_order(32);
  for (unsigned w = 0; w < warps; ++w) warp_order[w] = w;
  for (unsigned l = 0; l < 32; ++l) lane_order[l] = l;
  if (e.config.schedule == 1) {
    std::reverse(warp_order.begin(), warp_order.end());
    std::reverse(lane_order.begin(), lane_order.end());
  }
  std::vector<Fiber*> lanes(32);
  while (true) {
    if (e.config.schedule == 2) std::shuffle(warp_order.begin(), warp_order.end(), e.rng);
    bool progressed = false;
    for (unsigned w : warp_order) {
      const unsigned w0 = w * 32, width = std::min(32u, n - w0);
      for (bool ran = true; ran;) {
        ran = false;
        if (e.config.schedule == 2) std::shuffle(lane_order.begin(), lane_order.end(), e.rng);
        for (unsigned l : lane_order) {
          if (l >= width) continue;
          Fiber& f = e.fibers[w0 + l];
          if (f.state != State::Runnable) continue;
          run_fiber(f);
          ran = progressed = true;
          if (!e.failure.empty()) return;
        }
        // Complete the warp's collective if every lane is now there.
        bool any = false, all = width == 32;
        for (unsigned l = 0; l < width; ++l) {
          lanes[l] = &e.fibers[w0 + l];
          any = any || lanes[l]->state == State::AtWarp;
          all = all && lanes[l]->state == State::AtWarp;
        }
        if (!any) continue;
        for (unsigned l = 0; l < width; ++l)
          if (lanes[l]->state == State::Done) {
            e.failure = "lane " + std::to_string(l) + " of warp " + std::to_string(w) +
                        " exited while its warp waits at a full-mask warp collective";
            return;
          }
        if (all) {
          complete_warp(lanes);
          if (!e.failure.empty()) return;
        }
      }
    }
    unsigned live = 0, at_barrier = 0;
    for (unsigned i = 0; i < n; ++i) {
      live += e.fibers[i].state != State::Done;
      at_barrier += e.fibers[i].state == State::AtBarrier;
    }
    if (live == 0) return;
    if (at_barrier == live) {
      for (unsigned i = 0; i < n; ++i)
        if (e.fibers[i].state == State::AtBarrier) e.fibers[i].state = State::Runnable;
      continue;
    }
    if (!progressed) {
      std::string states;
      for (unsigned i = 0; i < n && states.size() < 400; i += 32) {
        states += " warp " + std::to_string(i / 32) + ":";
        for (unsigned l = i; l < i + 32 && l < n; ++l)
          states += "DBWR"[e.fibers[l].state == State::Done ? 0 : e.fibers[l].state == State::AtBarrier ? 1
                           : e.fibers[l].state == State::AtWarp ? 2 : 3];
      }
      e.failure = "deadlock in block (" + std::to_string(e.block_idx.x) + "," + std::to_string(e.block_idx.y) +
                  "): some threads wait at __syncthreads, others at a warp collective (D done, B barrier, W warp):" +
                  states;
      return;
    }
  }
}

cudaError_t set_error(cudaError_t code, const std::string& message) {
  Emu& e = emu();
  e.last_error = code;
  e.last_message = message;
  return code;
}

}  // namespace

const uint3& thread_idx() { return emu().current->tid; }
const uint3& block_idx() { return emu().block_idx; }
const dim3& block_dim() { return emu().block; }
const dim3& grid_dim() { return emu().grid; }

void syncthreads() {
  Emu& e = emu();
  e.current->state = State::AtBarrier;
  yield_to_scheduler();
  if (!e.failure.empty()) fail_in_fiber(e.failure);
}

uint32_t shfl_xor32(unsigned mask, uint32_t value, int lane_mask, int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail_in_fiber("__shfl_xor_sync: width must be a power of two <= 32");
  LaneSlot s;
  s.kind = Collective::Shuffle;
  s.mask = mask;
  s.lane_mask = lane_mask;
  s.width = width;
  s.in = value;
  warp_collective(s);
  return emu().current->slot.out;
}

void ptx_mma(const char* instr, std::array<float*, 4> d, std::array<uint32_t, 4> a, std::array<uint32_t, 2> b,
             std::array<float, 4> c) {
  if (std::strcmp(instr, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") != 0 &&
      std::strcmp(instr, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") != 0)
    fail_in_fiber(std::string("PTX instruction not emulated: ") + instr);
  LaneSlot s;
  s.kind = Collective::Mma;
  s.mask = 0xffffffffu;
  s.instr = instr;
  s.a = a;
  s.b = b;
  s.c = c;
  warp_collective(s);
  const LaneSlot& out = emu().current->slot;
  for (int i = 0; i < 4; ++i) *d[i] = out.d[i];
}

void* dynamic_smem() { return emu().dynamic_smem.data(); }

void* static_smem(int site, size_t bytes, size_t align) {
  Emu& e = emu();
  auto it = e.static_sites.find(site);
  if (it != e.static_sites.end()) return e.static_arena.data() + it->second;
  size_t off = (e.static_used + align - 1) / align * align;
  if (off + bytes > kStaticSmemLimit) fail_in_fiber("static shared memory over 48 KiB");
  e.static_sites[site] = off;
  e.static_used = off + bytes;
  return e.static_arena.data() + off;
}

void launch_impl(const LaunchConfig& cfg, const void* kernel, std::function<void()> body) {
  Emu& e = emu();
  const dim3 g = cfg.grid, b = cfg.block;
  if (b.x == 0 || b.y == 0 || b.z == 0 || block_size(b) > 1024 || b.z > 64) {
    set_error(cudaErrorInvalidConfiguration, "invalid block size");
    return;
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid grid size (" + std::to_string(g.x) + ", " +
                                                 std::to_string(g.y) + ", " + std::to_string(g.z) + ")");
    return;
  }
  auto attr = e.max_dynamic_smem_attr.find(kernel);
  const size_t allowed = attr != e.max_dynamic_smem_attr.end() ? attr->second : kDefaultDynamicSmem;
  if (cfg.smem > allowed) {
    set_error(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(cfg.smem) + " bytes over the kernel's limit of " +
                                         std::to_string(allowed) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
    return;
  }
  e.body = std::move(body);
  e.grid = g;
  e.block = b;
  e.dynamic_smem.assign(cfg.smem, 0xFF);
  e.static_arena.assign(kStaticSmemLimit, 0xFF);
  e.failure.clear();
  FaultHandlers faults;
  for (unsigned z = 0; z < g.z && e.failure.empty(); ++z)
    for (unsigned y = 0; y < g.y && e.failure.empty(); ++y)
      for (unsigned x = 0; x < g.x && e.failure.empty(); ++x) {
        e.block_idx = make_uint3(x, y, z);
        run_block();
      }
  if (!e.failure.empty()) set_error(cudaErrorLaunchFailure, e.failure);
  if (e.static_used + cfg.smem > e.config.max_dynamic_smem)
    set_error(cudaErrorInvalidValue, "static + dynamic shared memory over the device maximum");
  e.body = nullptr;
}

}  // namespace vk_emu

// ---- The CUDA runtime calls csrc/ makes, with the signatures of cuda_runtime_api.h.
cudaError_t CUDARTAPI cudaGetLastError(void) {
  vk_emu::Emu& e = vk_emu::emu();
  const cudaError_t r = e.last_error;
  e.last_error = cudaSuccess;
  return r;
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

const char* CUDARTAPI cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure:  // the emulator knows why: say it (the torch layer puts this in its error)
      return vk_emu::emu().last_message.empty() ? "unspecified launch failure" : vk_emu::emu().last_message.c_str();
    default: return "cuda error (emulated)";
  }
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  vk_emu::Emu& e = vk_emu::emu();
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > e.config.max_dynamic_smem)
      return vk_emu::set_error(cudaErrorInvalidValue, "cudaFuncAttributeMaxDynamicSharedMemorySize over the device maximum");
    e.max_dynamic_smem_attr[func] = static_cast<size_t>(value);
  }
  return cudaSuccess;
}

// ---- UBSan's handlers. emulator.py compiles the kernels with -fsanitize=alignment,signed-integer-
// overflow,... and -fno-sanitize-recover, and links no UBSan runtime: these are the handlers. Undefined
// behaviour inside a kernel fails its launch with the source location, so the test sees it (x86
// forgives a misaligned 16-byte access; a GPU faults). Every handler's data starts with the location.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};

[[noreturn]] void undefined_behaviour(const void* data, const std::string& what) {
  const SourceLocation* loc = static_cast<const SourceLocation*>(data);
  const std::string msg = "undefined behaviour: " + what + " at " + (loc->file ? loc->file : "?") + ":" +
                          std::to_string(loc->line) + ":" + std::to_string(loc->column);
  if (vk_emu::emu().current != nullptr) vk_emu::fail_in_fiber(msg);
  std::fprintf(stderr, "vk_emu: %s (host code)\n", msg.c_str());
  std::abort();
}
}  // namespace

extern "C" {
void __ubsan_handle_type_mismatch_v1_abort(void* data, uintptr_t ptr) {
  struct TypeMismatchData {
    SourceLocation loc;
    const void* type;
    unsigned char log_alignment, type_check_kind;
  };
  const auto* d = static_cast<const TypeMismatchData*>(data);
  const uintptr_t align = uintptr_t(1) << d->log_alignment;
  char buf[128];
  if (ptr == 0) std::snprintf(buf, sizeof buf, "access through a null pointer");
  else if (ptr & (align - 1)) std::snprintf(buf, sizeof buf, "misaligned access at %#lx (needs %lu-byte alignment)", (unsigned long)ptr, (unsigned long)align);
  else std::snprintf(buf, sizeof buf, "access at %#lx to an object too small for its type", (unsigned long)ptr);
  undefined_behaviour(data, buf);
}
void __ubsan_handle_add_overflow_abort(void* d, uintptr_t, uintptr_t) { undefined_behaviour(d, "signed integer overflow in +"); }
void __ubsan_handle_sub_overflow_abort(void* d, uintptr_t, uintptr_t) { undefined_behaviour(d, "signed integer overflow in -"); }
void __ubsan_handle_mul_overflow_abort(void* d, uintptr_t, uintptr_t) { undefined_behaviour(d, "signed integer overflow in *"); }
void __ubsan_handle_negate_overflow_abort(void* d, uintptr_t) { undefined_behaviour(d, "signed integer overflow in unary -"); }
void __ubsan_handle_divrem_overflow_abort(void* d, uintptr_t, uintptr_t) { undefined_behaviour(d, "division overflow or by zero"); }
void __ubsan_handle_shift_out_of_bounds_abort(void* d, uintptr_t, uintptr_t) { undefined_behaviour(d, "shift out of bounds"); }
void __ubsan_handle_out_of_bounds_abort(void* d, uintptr_t) { undefined_behaviour(d, "array index out of bounds"); }
void __ubsan_handle_vla_bound_not_positive_abort(void* d, uintptr_t) { undefined_behaviour(d, "non-positive VLA bound"); }
}

// ---- Control from the tests (ctypes).
extern "C" {
// schedule: 0 forward, 1 reverse, 2 random (seeded); max_dynamic_smem: the device's per-block maximum.
void vk_emu_configure(int schedule, unsigned seed, long long max_dynamic_smem) {
  vk_emu::Emu& e = vk_emu::emu();
  e.config.schedule = schedule;
  e.config.seed = seed;
  e.config.max_dynamic_smem = static_cast<size_t>(max_dynamic_smem);
  e.rng.seed(seed);
}
// The message of the last launch that failed (kept until the next failure), "" if none.
const char* vk_emu_last_message() { return vk_emu::emu().last_message.c_str(); }
}
