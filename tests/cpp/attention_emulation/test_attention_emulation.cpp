// The attention kernels (csrc/attention, unchanged) run on the host: one std::thread per CUDA
// thread, warps and CTAs synchronised with barriers, and the PTX they use (ldmatrix, mma,
// cp.async, see attention/ptx.h here) emulated from the PTX ISA's fragment tables. cp.async
// copies land only at the wait that must cover them, and shared memory starts as NaN, so a
// missing or early wait, a tail not masked or a fragment read from the wrong lane shows up as
// a wrong out / lse / dq / dk / dv against a float64 reference computed here. Small shapes
// cover both head-dim buckets, bf16 and fp16, causal with q longer and shorter than k (rows
// that see no key), GQA/MQA, odd lengths and strided (b, l, h, d) inputs. Not covered: timing
// (a real GPU may order things this emulation never does) and speed.
#include "attention/attention_bwd_kernel.h"
#include "attention/attention_fwd_kernel.h"

#include <barrier>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

thread_local dim3e threadIdx;
dim3e blockIdx, gridDim;
namespace heteromem { namespace attention { alignas(128) unsigned char smem_raw[256 * 1024]; } }

namespace emu {
unsigned char* smem_base = heteromem::attention::smem_raw;
struct Warp {
  std::barrier<> bar{32};
  uint32_t a[32][4], b[32][2], addr[32];
  float f[32];
};
std::vector<std::unique_ptr<Warp>> warps;
std::unique_ptr<std::barrier<>> cta_bar;
std::mutex atomic_mu;
int errors = 0;
thread_local std::vector<std::vector<Pending>> groups;  // committed groups, oldest first
thread_local std::vector<Pending> open_group;

Warp& warp() { return *warps[threadIdx.x / 32]; }
int lane() { return threadIdx.x % 32; }
void syncthreads() { cta_bar->arrive_and_wait(); }
void syncwarp() { warp().bar.arrive_and_wait(); }
float shfl_xor(float v, int m) {
  Warp& w = warp();
  w.f[lane()] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[lane() ^ m];
  w.bar.arrive_and_wait();
  return r;
}
void cp_async(uint32_t dst, const void* src, int bytes, int cp_size) {
  if (dst % cp_size) { std::printf("cp.async dst misaligned %u\n", dst); ++errors; }
  if (bytes && reinterpret_cast<uintptr_t>(src) % cp_size) {
    std::printf("cp.async src misaligned\n");
    ++errors;
  }
  open_group.push_back({dst, src, bytes, cp_size});
}
void commit() { groups.push_back(std::move(open_group)); open_group.clear(); }
void wait(int n) {
  while (static_cast<int>(groups.size()) > n) {
    for (const Pending& p : groups.front()) {
      std::memset(smem_base + p.dst, 0, p.fill);
      if (p.n) std::memcpy(smem_base + p.dst, p.src, p.n);
    }
    groups.erase(groups.begin());
  }
}
uint16_t at16(uint32_t byte) {
  if (byte % 2 || byte >= sizeof(heteromem::attention::smem_raw)) {
    std::printf("bad smem addr\n");
    ++errors;
    return 0;
  }
  uint16_t v; std::memcpy(&v, smem_base + byte, 2); return v;
}
void ldsm(uint32_t (&r)[4], uint32_t addr, bool trans) {
  Warp& w = warp();
  const int l = lane();
  if (addr % 16) { std::printf("ldmatrix row misaligned\n"); ++errors; }
  w.addr[l] = addr;
  w.bar.arrive_and_wait();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = w.addr[8 * j + l / 4];
      lo = at16(row + 2 * (2 * (l % 4))); hi = at16(row + 2 * (2 * (l % 4) + 1));
    } else {
      lo = at16(w.addr[8 * j + 2 * (l % 4)] + 2 * (l / 4));
      hi = at16(w.addr[8 * j + 2 * (l % 4) + 1] + 2 * (l / 4));
    }
    r[j] = lo | (uint32_t(hi) << 16);
  }
  w.bar.arrive_and_wait();
}
float dec(uint16_t v, bool bf16) { return bf16 ? emu_bf2f(v) : emu_h2f(v); }
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b0; w.b[l][1] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int x = 0; x < 32; ++x) {
    const int g = x / 4, t = x % 4;
    auto lo = [&](uint32_t r) { return dec(r & 0xffff, bf16); };
    auto hi = [&](uint32_t r) { return dec(r >> 16, bf16); };
    A[g][2 * t] = lo(w.a[x][0]); A[g][2 * t + 1] = hi(w.a[x][0]);
    A[g + 8][2 * t] = lo(w.a[x][1]); A[g + 8][2 * t + 1] = hi(w.a[x][1]);
    A[g][2 * t + 8] = lo(w.a[x][2]); A[g][2 * t + 9] = hi(w.a[x][2]);
    A[g + 8][2 * t + 8] = lo(w.a[x][3]); A[g + 8][2 * t + 9] = hi(w.a[x][3]);
    B[2 * t][g] = lo(w.b[x][0]); B[2 * t + 1][g] = hi(w.b[x][0]);
    B[2 * t + 8][g] = lo(w.b[x][1]); B[2 * t + 9][g] = hi(w.b[x][1]);
  }
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
    double s = c[i];
    for (int k = 0; k < 16; ++k) s += double(A[row][k]) * B[k][col];
    c[i] = float(s);
  }
  w.bar.arrive_and_wait();
}
void atomic_add(float* p, float v) { std::lock_guard<std::mutex> g(atomic_mu); *p += v; }

// Runs `body` (one kernel call) for every CTA of `grid`, one CTA at a time.
void launch(dim3e grid, int threads, const std::function<void()>& body) {
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        // All-ones bytes: NaN in bf16, fp16 and fp32, so reading what no copy wrote shows.
        std::memset(heteromem::attention::smem_raw, 0xff, sizeof(heteromem::attention::smem_raw));
        warps.clear();
        for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
        cta_bar = std::make_unique<std::barrier<>>(threads);
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            threadIdx = {unsigned(t), 0, 0};
            body();
            if (!groups.empty() || !open_group.empty()) {
              std::printf("cp.async left pending at exit\n");
              ++errors;
            }
            groups.clear(); open_group.clear();
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu

using namespace heteromem::attention;

struct Case { int b, hq, hk, lq, lk, d; bool causal; bool bshd; };

template <int kHeadDim, typename T, bool kCausal>
double run_case(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  auto enc = [&](float f) { T t; t.v = bf16 ? emu_f2bf(f) : emu_f2h(f); return t; };
  auto decf = [&](T t) { return emu::dec(t.v, bf16); };
  // Layout (b, h, l, d) or, bshd, (b, l, h, d) viewed as (b, h, l, d).
  auto make = [&](int heads, int len, TensorRef& ref, std::vector<T>& buf) {
    buf.resize(size_t(c.b) * heads * len * c.d);
    for (auto& x : buf) x = enc(nd(rng));
    if (c.bshd) ref = {buf.data(), int64_t(len) * heads * c.d, c.d, int64_t(heads) * c.d};
    else ref = {buf.data(), int64_t(heads) * len * c.d, int64_t(len) * c.d, c.d};
  };
  auto at = [&](const std::vector<T>& buf, const TensorRef& r, int b, int h, int i, int d) {
    return double(decf(buf[b * r.batch_stride + h * r.head_stride + i * r.row_stride + d]));
  };
  std::vector<T> q, k, v, dout;
  TensorRef rq, rk, rv, rdo;
  make(c.hq, c.lq, rq, q);
  make(c.hk, c.lk, rk, k);
  make(c.hk, c.lk, rv, v);
  make(c.hq, c.lq, rdo, dout);
  Shape sh{c.b, c.hq, c.hk, c.lq, c.lk, c.d, 1.f / std::sqrt(float(c.d)), 0};
  sh.scale_log2 = sh.scale * 1.4426950408889634f;
  std::vector<T> out(size_t(c.b) * c.hq * c.lq * c.d, enc(NAN));
  std::vector<float> lse(size_t(c.b) * c.hq * c.lq, NAN);
  FwdParams fp{sh, rq, rk, rv, out.data(), lse.data()};
  using FC = FwdConfig<kHeadDim>;
  emu::launch({unsigned(ceil_div(c.lq, FC::kBlockM)), unsigned(c.hq), unsigned(c.b)}, FC::kThreads,
              [&] { attention_fwd_kernel<kHeadDim, T, kCausal>(fp); });

  std::vector<float> dsum(lse.size(), NAN), dqacc(out.size(), NAN);
  std::vector<T> dq(out.size(), enc(NAN));
  std::vector<T> dk(size_t(c.b) * c.hk * c.lk * c.d, enc(NAN)), dv(dk.size(), enc(NAN));
  TensorRef rout{out.data(), int64_t(c.hq) * c.lq * c.d, int64_t(c.lq) * c.d, c.d};
  BwdParams bp{sh,          rq,          rk,           rv,        rout,      rdo,
               lse.data(),  dsum.data(), dqacc.data(), dq.data(), dk.data(), dv.data()};
  using BC = BwdConfig<kHeadDim>;
  const int64_t rows = int64_t(c.b) * c.hq * c.lq, rpc = kPassThreads / (kHeadDim / 8);
  // The three launches of run_attention_bwd, with its grids.
  emu::launch({unsigned((rows + rpc - 1) / rpc), 1, 1}, kPassThreads,
              [&] { attention_bwd_dsum_kernel<kHeadDim, T>(bp); });
  emu::launch({unsigned(ceil_div(c.lk, BC::kBlockN)), unsigned(c.hk), unsigned(c.b)}, BC::kThreads,
              [&] { attention_bwd_kernel<kHeadDim, T, kCausal>(bp); });
  const int64_t n = rows * c.d, per_cta = 4 * kPassThreads;
  emu::launch({unsigned((n + per_cta - 1) / per_cta), 1, 1}, kPassThreads,
              [&] { attention_bwd_dq_kernel<T>(bp, n); });

  // float64 reference from the same (rounded) inputs; dO paired with the kernel's own out for dsum.
  const int group = c.hq / c.hk, diag = c.lk - c.lq;
  double worst = 0;
  auto err = [&](double got, double want, double tol, const char* what, int b, int h, int i,
                 int d) {
    const double e = std::fabs(got - want);
    if (!(e <= tol)) {
      if (worst < 1e9) {
        std::printf("  %s mismatch b%d h%d i%d d%d: got %g want %g\n", what, b, h, i, d, got,
                    want);
      }
      worst = 1e18;
    }
  };
  std::vector<double> gk(dk.size(), 0), gv(dk.size(), 0);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.hq; ++h) {
      const int hk = h / group;
      for (int i = 0; i < c.lq; ++i) {
        std::vector<double> s(c.lk), p(c.lk, 0), dp(c.lk);
        double m = -INFINITY;
        for (int j = 0; j < c.lk; ++j) {
          double acc = 0;
          for (int d = 0; d < c.d; ++d) acc += at(q, rq, b, h, i, d) * at(k, rk, b, hk, j, d);
          s[j] = (!kCausal || j <= i + diag) ? acc * sh.scale : -INFINITY;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        if (m > -INFINITY) for (int j = 0; j < c.lk; ++j) sum += (p[j] = std::exp(s[j] - m));
        const double ref_lse = sum > 0 ? m + std::log(sum) : INFINITY;
        const size_t row = (size_t(b) * c.hq + h) * c.lq + i;
        if (std::isinf(ref_lse)) {  // a row that sees no key: lse +inf, output 0
          err(std::isinf(lse[row]) && lse[row] > 0 ? 0 : 1, 0, 0.5, "lse(inf)", b, h, i, 0);
        } else {
          err(lse[row], ref_lse, 1e-3, "lse", b, h, i, 0);
        }
        for (int j = 0; j < c.lk; ++j) p[j] = sum > 0 ? p[j] / sum : 0;
        double D = 0;
        for (int d = 0; d < c.d; ++d) {
          double o = 0;
          for (int j = 0; j < c.lk; ++j) o += p[j] * at(v, rv, b, hk, j, d);
          const double got = decf(out[row * c.d + d]);
          err(got, o, 2e-2 * (1 + std::fabs(o)), "out", b, h, i, d);
          D += at(dout, rdo, b, h, i, d) * got;
        }
        for (int j = 0; j < c.lk; ++j) {
          double acc = 0;
          for (int d = 0; d < c.d; ++d) acc += at(dout, rdo, b, h, i, d) * at(v, rv, b, hk, j, d);
          dp[j] = p[j] * (acc - D);  // dS (without scale)
        }
        for (int d = 0; d < c.d; ++d) {
          double g = 0;
          for (int j = 0; j < c.lk; ++j) g += dp[j] * at(k, rk, b, hk, j, d);
          g *= sh.scale;
          err(decf(dq[row * c.d + d]), g, 5e-2 * (1 + std::fabs(g)), "dq", b, h, i, d);
          for (int j = 0; j < c.lk; ++j) {
            const size_t kr = ((size_t(b) * c.hk + hk) * c.lk + j) * c.d + d;
            gk[kr] += dp[j] * at(q, rq, b, h, i, d) * sh.scale;
            gv[kr] += p[j] * at(dout, rdo, b, h, i, d);
          }
        }
      }
    }
  for (size_t x = 0; x < gk.size(); ++x) {
    const int d = x % c.d, j = (x / c.d) % c.lk;
    err(decf(dk[x]), gk[x], 5e-2 * (1 + std::fabs(gk[x])), "dk", 0, 0, j, d);
    err(decf(dv[x]), gv[x], 5e-2 * (1 + std::fabs(gv[x])), "dv", 0, 0, j, d);
  }
  return worst;
}

template <int kHeadDim, typename T>
bool run(const Case& c, uint32_t seed) {
  const double w =
      c.causal ? run_case<kHeadDim, T, true>(c, seed) : run_case<kHeadDim, T, false>(c, seed);
  std::printf("%s b%d hq%d hk%d lq%d lk%d d%d causal%d bshd%d %s: %s\n",
              kHeadDim == 64 ? "h64 " : "h128", c.b, c.hq, c.hk, c.lq, c.lk, c.d, c.causal,
              c.bshd, std::is_same_v<T, __nv_bfloat16> ? "bf16" : "fp16",
              w == 0 && emu::errors == 0 ? "ok" : "FAIL");
  std::fflush(stdout);
  return w == 0 && emu::errors == 0;
}

int main() {
  bool ok = true;
  std::vector<Case> cases = {
      {1, 2, 1, 150, 70, 40, true, false},   // q > k: blind rows, skipped blocks, GQA
      {1, 2, 2, 37, 200, 64, true, true},    // q < k, strided (b, l, h, d)
      {1, 3, 1, 130, 129, 8, false, false},  // tails, MQA, head dim 8
      {2, 2, 1, 300, 77, 24, true, false},   // q >> k
      {1, 1, 1, 1, 140, 64, true, false},    // decode
  };
  for (const Case& c : cases) {
    ok &= c.d <= 64 ? run<64, __nv_bfloat16>(c, 1) : run<128, __nv_bfloat16>(c, 1);
  }
  std::vector<Case> cases128 = {
      {1, 2, 1, 150, 70, 96, true, false},
      {1, 2, 2, 65, 200, 128, true, true},
      {1, 2, 1, 129, 131, 72, false, false},
  };
  for (const Case& c : cases128) ok &= run<128, __nv_bfloat16>(c, 2);
  ok &= run<64, __half>({1, 2, 1, 100, 90, 64, true, false}, 3);
  ok &= run<128, __half>({1, 2, 1, 70, 150, 128, false, false}, 4);
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
