// Unit tests of the torch-free AGD and 8-bit Adam cores and of the 8-bit codes: every SIMD path
// agrees bit for bit with the scalar path (NaN payloads aside), including partial blocks, tiny
// and non-finite blocks; every code survives decode -> encode; codes decode to the values
// their format defines. Built and run by CMake/ctest (`make test-cpp`).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "../../csrc/cpu/adam8bit_core.h"
#include "../../csrc/cpu/adam_core.h"
#include "../../csrc/cpu/float16_convert.h"

using namespace heteromem;
using namespace heteromem::cpu;
using namespace heteromem::testing;
namespace q8 = heteromem::quant8;

namespace {

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return q8::bits_of(a) == q8::bits_of(b);
}

const ElemType kGrads[] = {ElemType::kFloat32, ElemType::kBFloat16, ElemType::kFloat16};
const ElemType kLowps[] = {ElemType::kNone, ElemType::kBFloat16, ElemType::kFloat16};

const char* type_name(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return "f32";
    case ElemType::kBFloat16: return "bf16";
    case ElemType::kFloat16: return "f16";
    default: return "none";
  }
}

// Gradients over ten decades (per element), with NaN/inf at a few places when asked.
std::vector<float> gradients(int64_t n, unsigned seed, bool specials) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> g(n);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = normal(rng) * std::pow(10.f, static_cast<float>(i % 11) - 6.f);
    if (specials && i % 613 == 5) g[i] = (i % 2) ? INFINITY : NAN;
  }
  return g;
}

struct GradBuffer {
  std::vector<float> f32;
  std::vector<uint16_t> h16;
  const void* ptr(ElemType t) const {
    return t == ElemType::kFloat32 ? static_cast<const void*>(f32.data()) : h16.data();
  }
};

GradBuffer grad_buffer(const std::vector<float>& g, ElemType t) {
  GradBuffer b{g, std::vector<uint16_t>(g.size())};
  for (size_t i = 0; i < g.size(); ++i) {
    b.h16[i] = t == ElemType::kBFloat16 ? float_to_bf16(g[i]) : float_to_fp16(g[i]);
  }
  return b;
}

// ------------------------------------------------------------------------------------ AGD

void test_agd_paths_bit_identical() {
  const Capability best = detect_capability();
  const int64_t sizes[] = {0, 1, 7, 8, 15, 16, 17, 33, 1000, 4099};
  for (Capability cap : {Capability::kAvx2, Capability::kAvx512}) {
    if (static_cast<int>(cap) > static_cast<int>(best)) {
      std::printf("skip: CPU lacks %s\n", capability_name(cap));
      continue;
    }
    for (ElemType gt : kGrads)
      for (ElemType lt : kLowps)
        for (int64_t n : sizes) {
          std::mt19937 rng(n);
          std::normal_distribution<float> normal(0.f, 1.f);
          std::vector<float> p(n), m(n), v(n);
          for (int64_t i = 0; i < n; ++i) {
            p[i] = normal(rng);
            m[i] = 1e-3f * normal(rng) * std::pow(10.f, -static_cast<float>(i % 5));
            v[i] = std::fabs(m[i] * m[i] * normal(rng));  // spread: the floor binds for some
          }
          std::vector<float> p2 = p, m2 = m, v2 = v;
          std::vector<uint16_t> lowp(n), lowp2(n);
          const auto g = grad_buffer(gradients(n, 7 + n, true), gt);
          AdamBuffers a{p.data(), g.ptr(gt), gt, m.data(), v.data(), lowp.data(), lt};
          AdamBuffers b{p2.data(), g.ptr(gt), gt, m2.data(), v2.data(), lowp2.data(), lt};
          for (int64_t step = 1; step <= 3; ++step) {
            const double decay = step == 2 ? 0.1 : 0.0;
            const double grad_scale = gt == ElemType::kFloat32 ? 1.0 : 64.0;
            const AgdScalars s =
                make_agd_scalars(step, 1e-3, 0.9, 0.999, 1e-4, decay, grad_scale);
            agd_update(a, s, 0, n, Capability::kScalar);
            agd_update(b, s, 0, n, cap);
          }
          bool ok = lowp == lowp2 || lt == ElemType::kNone;
          for (int64_t i = 0; i < n; ++i) {
            ok = ok && same_float(p[i], p2[i]) && same_float(m[i], m2[i]) &&
                 same_float(v[i], v2[i]);
          }
          check(ok, std::string("agd ") + capability_name(cap) + " grad=" + type_name(gt) +
                        " lowp=" + type_name(lt) + " n=" + std::to_string(n));
        }
  }
}

void test_agd_floor_switch() {
  // A zero second moment is floored: the step is lr * sqrt(1 - b2) / (1 - b1) * m / floor.
  float p = 0.f, m = 0.f, v = 0.f;
  const AgdScalars s = make_agd_scalars(1, 0.1, 0.9, 0.999, 1.0, 0.0, 1.0);
  const float out = agd_element(p, 1e-6f, m, v, s);
  check(std::fabs(out + 0.1f * 1e-7f / 0.1f) < 1e-12f, "agd floor: SGD-with-momentum step");
  float nan_m = 0.f, nan_v = 0.f;
  check(std::isnan(agd_element(0.f, NAN, nan_m, nan_v, s)), "agd: a NaN gradient gives NaN");
}

// ------------------------------------------------------------------------------ 8-bit codes

void test_code_values() {
  check(q8::decode_exp_avg(0) == 0.f && std::signbit(q8::decode_exp_avg(0x80)), "exp_avg zeros");
  check(q8::decode_exp_avg(127) == q8::kExpAvgMax, "exp_avg top code");
  check(q8::decode_exp_avg(0x80 | 127) == -q8::kExpAvgMax, "exp_avg sign");
  check(q8::decode_exp_avg(1) == std::ldexp(1.f, -11), "exp_avg first step is 2^-11");
  check(q8::decode_exp_avg_sq(0) == std::ldexp(1.f, -15), "exp_avg_sq floor");
  check(q8::decode_exp_avg_sq(255) == q8::kExpAvgSqMax, "exp_avg_sq top code");
  bool increasing = true;
  for (uint32_t k = 1; k < 128; ++k) {
    increasing = increasing && q8::decode_exp_avg(k) > q8::decode_exp_avg(k - 1);
  }
  for (uint32_t k = 1; k < 256; ++k) {
    increasing = increasing && q8::decode_exp_avg_sq(k) > q8::decode_exp_avg_sq(k - 1);
  }
  check(increasing, "codes are ordered");
}

void test_every_code_round_trips() {
  // Values decoded at inv = 1 (scale = the format's largest value) encode to their own code.
  bool ok = true;
  for (uint32_t k = 0; k < 256; ++k) {
    ok = ok && q8::encode_exp_avg(q8::decode_exp_avg(k), 1.0f) == k;
    ok = ok && q8::encode_exp_avg_sq(q8::decode_exp_avg_sq(k), 1.0f) == k;
  }
  check(ok, "decode -> encode returns all 256 codes of both formats");
  // Midpoints between neighbours round away from zero; just below them, down.
  bool mid = true;
  for (uint32_t k = 1; k < 255; ++k) {
    const float lo = q8::decode_exp_avg_sq(k), hi = q8::decode_exp_avg_sq(k + 1);
    const float m = 0.5f * (lo + hi);
    mid = mid && q8::encode_exp_avg_sq(m, 1.0f) == k + 1;
    mid = mid && q8::encode_exp_avg_sq(std::nextafter(m, 0.f), 1.0f) == k;
  }
  check(mid, "exp_avg_sq rounds to nearest, ties up");
  check(q8::encode_exp_avg_sq(0.f, 1.0f) == 0 && q8::encode_exp_avg_sq(1e-30f, 1.0f) == 0,
        "exp_avg_sq: below the floor -> the floor code");
}

void test_block_scale_cases() {
  const auto zero = q8::block_scale(0, q8::kExpAvgMax);
  const auto tiny = q8::block_scale(0x00400000u, q8::kExpAvgMax);
  const auto inf = q8::block_scale(0x7f800000u, q8::kExpAvgMax);
  const auto nan = q8::block_scale(0x7fc00001u, q8::kExpAvgMax);
  check(!zero.encode && zero.scale == 0.f && !tiny.encode && tiny.scale == 0.f, "zero/tiny blocks");
  check(!inf.encode && std::isnan(inf.scale) && !nan.encode && std::isnan(nan.scale),
        "non-finite blocks");
  const auto one = q8::block_scale(q8::bits_of(3.0f), q8::kExpAvgSqMax);
  check(one.encode && one.scale == 3.0f / q8::kExpAvgSqMax && one.inv == q8::kExpAvgSqMax / 3.0f,
        "block scale and inverse are single divisions");
}

// ---------------------------------------------------------------------------- 8-bit Adam

struct State8 {
  std::vector<float> param;
  std::vector<uint8_t> m, v;
  std::vector<float> m_scale, v_scale;
  std::vector<uint16_t> lowp;
};

State8 make_state8(int64_t n) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  State8 s;
  s.param.resize(n);
  for (auto& x : s.param) x = normal(rng);
  s.m.assign(n, 0);
  s.v.assign(n, 0);
  s.m_scale.assign((n + q8::kBlock - 1) / q8::kBlock, 0.f);
  s.v_scale = s.m_scale;
  s.lowp.assign(n, 0);
  return s;
}

Adam8bitBuffers buffers8(State8& s, const GradBuffer& g, ElemType gt, ElemType lt) {
  return Adam8bitBuffers{s.param.data(), g.ptr(gt), gt, s.m.data(), s.m_scale.data(),
                         s.v.data(), s.v_scale.data(), s.lowp.data(), lt};
}

bool same_state8(const State8& a, const State8& b, ElemType lt) {
  bool ok = a.m == b.m && a.v == b.v && (lt == ElemType::kNone || a.lowp == b.lowp);
  for (size_t i = 0; i < a.param.size(); ++i) ok = ok && same_float(a.param[i], b.param[i]);
  for (size_t i = 0; i < a.m_scale.size(); ++i) {
    ok = ok && same_float(a.m_scale[i], b.m_scale[i]) && same_float(a.v_scale[i], b.v_scale[i]);
  }
  return ok;
}

void test_adam8bit_paths_bit_identical() {
  const Capability best = detect_capability();
  const int64_t sizes[] = {0, 1, 15, 16, 17, 255, 256, 257, 1000, 3 * 256 + 200};
  for (Capability cap : {Capability::kAvx2, Capability::kAvx512}) {
    if (static_cast<int>(cap) > static_cast<int>(best)) continue;
    for (ElemType gt : kGrads)
      for (ElemType lt : kLowps)
        for (int64_t n : sizes)
          for (bool specials : {false, true}) {
            State8 a = make_state8(n), b = make_state8(n);
            const auto g = grad_buffer(gradients(n, 11 + n, specials), gt);
            const Adam8bitBuffers ba = buffers8(a, g, gt, lt), bb = buffers8(b, g, gt, lt);
            for (int64_t step = 1; step <= 4; ++step) {
              const AdamScalars s = make_adam_scalars(step, 1e-3, 0.9, 0.999, 1e-8, 0.1,
                                                      step % 2 == 1, 8.0);
              adam8bit_update(ba, s, 0, n, Capability::kScalar);
              adam8bit_update(bb, s, 0, n, cap);
            }
            check(same_state8(a, b, lt),
                  std::string("adam8bit ") + capability_name(cap) + " grad=" + type_name(gt) +
                      " lowp=" + type_name(lt) + " n=" + std::to_string(n) +
                      (specials ? " with inf/nan" : ""));
          }
  }
}

void test_adam8bit_ranges_compose() {
  // Threads update disjoint ranges of whole blocks: the result equals one call over everything.
  const int64_t n = 10 * 256 + 31;
  State8 a = make_state8(n), b = make_state8(n);
  const auto g = grad_buffer(gradients(n, 5, false), ElemType::kFloat32);
  const Adam8bitBuffers ba = buffers8(a, g, ElemType::kFloat32, ElemType::kNone);
  const Adam8bitBuffers bb = buffers8(b, g, ElemType::kFloat32, ElemType::kNone);
  const AdamScalars s = make_adam_scalars(1, 1e-3, 0.9, 0.999, 1e-8, 0.0, true, 1.0);
  adam8bit_update(ba, s, 0, n, detect_capability());
  adam8bit_update(bb, s, 0, 3 * 256, detect_capability());
  adam8bit_update(bb, s, 3 * 256, 7 * 256, detect_capability());
  adam8bit_update(bb, s, 7 * 256, n, detect_capability());
  check(same_state8(a, b, ElemType::kNone), "adam8bit: block-aligned ranges compose");
}

}  // namespace

int main() {
  test_agd_paths_bit_identical();
  test_agd_floor_switch();
  test_code_values();
  test_every_code_round_trips();
  test_block_scale_cases();
  test_adam8bit_paths_bit_identical();
  test_adam8bit_ranges_compose();
  std::printf("optimizer cores (best path: %s): %d checks, %d failed\n",
              capability_name(detect_capability()), g_checks, g_failures);
  return exit_code();
}
