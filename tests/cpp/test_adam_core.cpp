// Unit tests of the torch-free CPU Adam core: every SIMD path must agree bit for bit with the
// scalar path (NaN payloads aside), and the software fp16/bf16 conversions must be exact.
// Built and run by CMake/ctest (`make test-cpp`).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "../../csrc/cpu/adam_core.h"
#include "../../csrc/cpu/float16_convert.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

using namespace heteromem;
using namespace heteromem::cpu;
using namespace heteromem::testing;

namespace {

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return float_bits(a) == float_bits(b);
}

bool same_half(uint16_t a, uint16_t b, bool bf16) {
  const bool nan_a = bf16 ? std::isnan(bf16_to_float(a)) : std::isnan(fp16_to_float(a));
  const bool nan_b = bf16 ? std::isnan(bf16_to_float(b)) : std::isnan(fp16_to_float(b));
  if (nan_a || nan_b) return nan_a && nan_b;
  return a == b;
}

struct Case {
  std::vector<float> param, exp_avg, exp_avg_sq;
  std::vector<uint16_t> grad16, lowp;
  std::vector<float> grad32;
};

Case make_case(int64_t n, ElemType grad_type, unsigned seed, bool specials) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  Case c;
  c.param.resize(n);
  c.exp_avg.resize(n);
  c.exp_avg_sq.resize(n);
  c.grad32.resize(n);
  c.grad16.resize(n);
  c.lowp.assign(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    c.param[i] = normal(rng);
    c.exp_avg[i] = 0.1f * normal(rng);
    c.exp_avg_sq[i] = std::fabs(0.01f * normal(rng));
    float g = normal(rng) * std::pow(10.f, static_cast<float>(static_cast<int>(i % 9) - 6));
    if (specials && i % 13 == 5) g = (i % 2) ? INFINITY : NAN;
    if (specials && i % 17 == 3) c.param[i] = 1e-40f;  // subnormal parameter
    c.grad32[i] = g;
    c.grad16[i] = grad_type == ElemType::kBFloat16 ? float_to_bf16(g) : float_to_fp16(g);
  }
  return c;
}

AdamBuffers buffers_of(Case& c, ElemType grad_type, ElemType lowp_type) {
  AdamBuffers b;
  b.param = c.param.data();
  b.exp_avg = c.exp_avg.data();
  b.exp_avg_sq = c.exp_avg_sq.data();
  b.grad_type = grad_type;
  b.grad = grad_type == ElemType::kFloat32 ? static_cast<const void*>(c.grad32.data())
                                           : static_cast<const void*>(c.grad16.data());
  b.lowp_type = lowp_type;
  b.param_lowp = lowp_type == ElemType::kNone ? nullptr : c.lowp.data();
  return b;
}

const char* type_name(ElemType t) {
  switch (t) {
    case ElemType::kFloat32:
      return "f32";
    case ElemType::kBFloat16:
      return "bf16";
    case ElemType::kFloat16:
      return "f16";
    default:
      return "none";
  }
}

void test_paths_bit_identical() {
  const Capability best = detect_capability();
  const ElemType grads[] = {ElemType::kFloat32, ElemType::kBFloat16, ElemType::kFloat16};
  const ElemType lowps[] = {ElemType::kNone, ElemType::kBFloat16, ElemType::kFloat16};
  const int64_t sizes[] = {0, 1, 7, 8, 15, 16, 17, 33, 1000, 4099};
  const bool adamws[] = {true, false};
  for (Capability cap : {Capability::kAvx2, Capability::kAvx512}) {
    if (static_cast<int>(cap) > static_cast<int>(best)) {
      std::printf("skip: CPU lacks %s\n", capability_name(cap));
      continue;
    }
    for (ElemType gt : grads)
      for (ElemType lt : lowps)
        for (int64_t n : sizes)
          for (bool adamw : adamws) {
            const AdamScalars s = make_adam_scalars(3, 1e-3, 0.9, 0.999, 1e-8, 0.1, adamw,
                                                    gt == ElemType::kFloat32 ? 1.0 : 1024.0);
            Case ref = make_case(n, gt, 42 + n, /*specials=*/true);
            Case simd = ref;
            AdamBuffers rb = buffers_of(ref, gt, lt);
            AdamBuffers sb = buffers_of(simd, gt, lt);
            for (int step = 0; step < 3; ++step) {
              adam_update(rb, s, 0, n, Capability::kScalar);
              adam_update(sb, s, 0, n, cap);
            }
            bool ok = true;
            for (int64_t i = 0; i < n; ++i) {
              ok = ok && same_float(ref.param[i], simd.param[i]) &&
                   same_float(ref.exp_avg[i], simd.exp_avg[i]) &&
                   same_float(ref.exp_avg_sq[i], simd.exp_avg_sq[i]);
              if (lt != ElemType::kNone)
                ok = ok && same_half(ref.lowp[i], simd.lowp[i], lt == ElemType::kBFloat16);
            }
            check(ok, std::string(capability_name(cap)) + " grad=" + type_name(gt) +
                          " lowp=" + type_name(lt) + " n=" + std::to_string(n) +
                          (adamw ? " adamw" : " adam"));
          }
  }
}

void test_subrange_only() {
  // Elements outside [begin, end) are untouched: threads rely on it.
  Case c = make_case(100, ElemType::kFloat32, 7, false);
  const Case before = c;
  AdamBuffers b = buffers_of(c, ElemType::kFloat32, ElemType::kNone);
  adam_update(b, make_adam_scalars(1, 1e-2, 0.9, 0.999, 1e-8, 0.0, true, 1.0), 10, 90,
              detect_capability());
  bool outside_same = true, inside_changed = true;
  for (int i = 0; i < 100; ++i) {
    const bool same = c.param[i] == before.param[i];
    if (i < 10 || i >= 90) outside_same = outside_same && same;
    else inside_changed = inside_changed && !same;
  }
  check(outside_same && inside_changed, "update touches exactly [begin, end)");
}

void test_first_step_value() {
  // Step 1 from zero moments: m = (1-b1) g, v = (1-b2) g^2, so the update is lr * g / (|g| + eps').
  float p = 1.0f, m = 0.f, v = 0.f;
  const AdamScalars s = make_adam_scalars(1, 0.1, 0.9, 0.999, 1e-8, 0.0, true, 1.0);
  const float out = adam_element(p, 0.5f, m, v, s);
  check(std::fabs(out - 0.9f) < 1e-6f, "first AdamW step moves the parameter by lr");
  check(std::fabs(m - 0.05f) < 1e-8f && std::fabs(v - 0.00025f) < 1e-9f, "first-step moments");
}

void test_half_conversions() {
  // Every fp16 value survives fp16 -> f32 -> fp16, and bf16 likewise.
  bool ok16 = true, okbf = true;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(f)) ok16 = ok16 && float_to_fp16(f) == h;
    const float b = bf16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(b)) okbf = okbf && float_to_bf16(b) == h;
  }
  check(ok16, "fp16 round trip of all 65536 values");
  check(okbf, "bf16 round trip of all 65536 values");
  // Ties go to even, overflow goes to infinity, tiny values to (signed) zero.
  check(float_to_bf16(bits_float(0x3f808000u)) == 0x3f80, "bf16 tie to even (down)");
  check(float_to_bf16(bits_float(0x3f818000u)) == 0x3f82, "bf16 tie to even (up)");
  check(float_to_fp16(65520.f) == 0x7c00, "fp16 overflow to inf");
  check(float_to_fp16(65519.f) == 0x7bff, "fp16 largest finite");
  check(float_to_fp16(-1e-10f) == 0x8000, "fp16 underflow to -0");
  check(float_to_fp16(std::ldexp(1.f, -24)) == 0x0001, "fp16 smallest subnormal");
  check(float_to_fp16(std::ldexp(1.f, -25)) == 0x0000, "fp16 half of smallest subnormal ties to 0");
}

#if defined(__x86_64__)
__attribute__((target("f16c"))) uint16_t f16c_convert(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

void test_fp16_matches_hardware() {
  if (!__builtin_cpu_supports("f16c")) {
    std::printf("skip: CPU lacks F16C\n");
    return;
  }
  // A stride over all 2^32 float bit patterns, plus the whole fp16 subnormal/normal boundary.
  bool ok = true;
  for (uint64_t u = 0; u < (1ull << 32); u += 997) {
    const float f = bits_float(static_cast<uint32_t>(u));
    if (std::isnan(f)) continue;
    ok = ok && float_to_fp16(f) == f16c_convert(f);
  }
  for (uint32_t u = 0x33000000u; u < 0x39000000u; u += 3) {
    const float f = bits_float(u);
    ok = ok && float_to_fp16(f) == f16c_convert(f) && float_to_fp16(-f) == f16c_convert(-f);
  }
  check(ok, "software fp16 rounding equals the F16C instruction");
}
#endif

}  // namespace

int main() {
  test_paths_bit_identical();
  test_subrange_only();
  test_first_step_value();
  test_half_conversions();
#if defined(__x86_64__)
  test_fp16_matches_hardware();
#endif
  std::printf("adam core (best path: %s): %d checks, %d failed\n",
              capability_name(detect_capability()), g_checks, g_failures);
  return exit_code();
}
