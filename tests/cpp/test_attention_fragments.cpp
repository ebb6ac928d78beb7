// The attention kernels' data movement, checked on the host without a GPU: shared-memory
// swizzle, ldmatrix lane addresses and the fragment re-use between products
// (csrc/attention/fragment_layout.h), composed exactly as warp_gemm.h and the backward's dQ
// step compose them. ldmatrix and mma.m16n8k16 are emulated from the PTX ISA's fragment tables
// (written out again here, independently of the header), so a wrong lane offset, swizzle or
// register order shows up as a wrong product. Built and run by CMake/ctest (`make test-cpp`).
#include <array>
#include <cstdint>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "check.h"
#include "../../csrc/attention/fragment_layout.h"

using namespace heteromem::attention;
using heteromem::testing::check;

namespace {

constexpr int kElem = 2;  // bytes of a 16-bit element

struct Reg {  // one 32-bit register holding two 16-bit values (lo = lower index)
  int lo = 0, hi = 0;
};
using Frag4 = std::array<std::array<Reg, 4>, 32>;  // [lane][register]
using Acc = std::array<std::array<double, 4>, 32>;  // [lane][c0..c3]

// Shared memory as 16-bit cells holding small integers (exact in any arithmetic).
struct Smem {
  std::vector<int> cells;
  explicit Smem(int n) : cells(n, 0) {}
  int at_byte(uint32_t addr) const { return cells.at(addr / kElem); }
};

// ldmatrix.sync.aligned.m8n8.x4[.trans].b16: lanes 8j..8j+7 give matrix j's row addresses.
Frag4 ldmatrix_x4(const Smem& s, const std::array<uint32_t, 32>& addr, bool trans) {
  Frag4 r;
  for (int j = 0; j < 4; ++j) {
    for (int l = 0; l < 32; ++l) {
      if (!trans) {  // lane l: row l/4, elements 2(l%4), 2(l%4)+1
        const uint32_t row = addr[8 * j + l / 4];
        r[l][j] = {s.at_byte(row + kElem * (2 * (l % 4))), s.at_byte(row + kElem * (2 * (l % 4) + 1))};
      } else {  // lane l: rows 2(l%4), 2(l%4)+1, element l/4
        r[l][j] = {s.at_byte(addr[8 * j + 2 * (l % 4)] + kElem * (l / 4)),
                   s.at_byte(addr[8 * j + 2 * (l % 4) + 1] + kElem * (l / 4))};
      }
    }
  }
  return r;
}

// mma.m16n8k16.row.col: c += A(16x16) B(16x8) with the ISA's A, B and C fragment tables.
void mma(Acc& c, const Frag4& a, const std::array<std::array<Reg, 2>, 32>& b) {
  double A[16][16] = {}, B[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    A[g][2 * t] = a[l][0].lo, A[g][2 * t + 1] = a[l][0].hi;
    A[g + 8][2 * t] = a[l][1].lo, A[g + 8][2 * t + 1] = a[l][1].hi;
    A[g][2 * t + 8] = a[l][2].lo, A[g][2 * t + 9] = a[l][2].hi;
    A[g + 8][2 * t + 8] = a[l][3].lo, A[g + 8][2 * t + 9] = a[l][3].hi;
    B[2 * t][g] = b[l][0].lo, B[2 * t + 1][g] = b[l][0].hi;
    B[2 * t + 8][g] = b[l][1].lo, B[2 * t + 9][g] = b[l][1].hi;
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
      double sum = 0;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      c[l][i] += sum;
    }
  }
}

std::array<std::array<Reg, 2>, 32> b_half(const Frag4& f, int first) {
  std::array<std::array<Reg, 2>, 32> b;
  for (int l = 0; l < 32; ++l) b[l] = {f[l][first], f[l][first + 1]};
  return b;
}

using Matrix = std::vector<std::vector<int>>;

Matrix random_matrix(int rows, int cols, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(-4, 4);
  Matrix m(rows, std::vector<int>(cols));
  for (auto& row : m) for (auto& x : row) x = dist(rng);
  return m;
}

// Stores m into a swizzled tile of kCols columns (what cp.async + swizzle<> produce).
template <int kCols>
Smem store_swizzled(const Matrix& m) {
  Smem s(static_cast<int>(m.size()) * kCols);
  for (size_t r = 0; r < m.size(); ++r)
    for (size_t c = 0; c < m[r].size(); ++c) s.cells[swizzle<kCols>(int(r), int(c))] = m[r][c];
  return s;
}

// Compares accumulators acc[mt][nt] against expect[row0 + 16 mt + i][col0 + 8 nt + j].
bool acc_matches(const std::vector<std::vector<Acc>>& acc, const std::vector<std::vector<double>>& expect,
                 int row0, int col0) {
  for (size_t mt = 0; mt < acc.size(); ++mt)
    for (size_t nt = 0; nt < acc[mt].size(); ++nt)
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i)
          if (acc[mt][nt][l][i] != expect[row0 + 16 * mt + c_row(l, i)][col0 + 8 * nt + c_col(l, i)])
            return false;
  return true;
}

// gemm_nt: acc[mt][nt] += A[a_row0 + 16 mt + i][k] * B[8 nt + j][k] over k < kDepth.
template <int kMTiles, int kNTiles, int kDepth>
void check_gemm_nt(int a_rows, int a_row0, std::mt19937& rng) {
  const Matrix A = random_matrix(a_rows, kDepth, rng), B = random_matrix(kNTiles * 8, kDepth, rng);
  const Smem sA = store_swizzled<kDepth>(A), sB = store_swizzled<kDepth>(B);
  std::vector<std::vector<Acc>> acc(kMTiles, std::vector<Acc>(kNTiles, Acc{}));
  for (int ks = 0; ks < kDepth / 16; ++ks) {
    std::array<uint32_t, 32> addr_a[kMTiles], addr_b[kNTiles / 2];
    for (int l = 0; l < 32; ++l) {
      const LaneOffset oa = ldsm_a(l), ob = ldsm_b(l);
      const SwizzledLane<kDepth, kElem> la(0, a_row0 + oa.row, oa.col), lb(0, ob.row, ob.col);
      for (int mt = 0; mt < kMTiles; ++mt) addr_a[mt][l] = la.at(mt * 16, ks * 16);
      for (int np = 0; np < kNTiles / 2; ++np) addr_b[np][l] = lb.at(np * 16, ks * 16);
    }
    for (int np = 0; np < kNTiles / 2; ++np) {
      const Frag4 b = ldmatrix_x4(sB, addr_b[np], false);
      for (int mt = 0; mt < kMTiles; ++mt) {
        const Frag4 a = ldmatrix_x4(sA, addr_a[mt], false);
        mma(acc[mt][2 * np], a, b_half(b, 0));
        mma(acc[mt][2 * np + 1], a, b_half(b, 2));
      }
    }
  }
  std::vector<std::vector<double>> expect(a_rows, std::vector<double>(kNTiles * 8, 0));
  for (int r = 0; r < a_rows; ++r)
    for (int n = 0; n < kNTiles * 8; ++n)
      for (int k = 0; k < kDepth; ++k) expect[r][n] += double(A[r][k]) * B[n][k];
  check(acc_matches(acc, expect, a_row0, 0),
        "gemm_nt<" + std::to_string(kMTiles) + "," + std::to_string(kNTiles) + "," +
            std::to_string(kDepth) + "> row0 " + std::to_string(a_row0) + " equals A B^T");
}

// gemm_rs: acc[mt][dt] += P[16 mt + i][k] * B[k][8 dt + j], P held as C-layout accumulators of
// kKTiles n8 tiles and re-packed into A fragments without moving data between lanes.
template <int kMTiles, int kKTiles, int kCols>
void check_gemm_rs(std::mt19937& rng) {
  const Matrix P = random_matrix(kMTiles * 16, kKTiles * 8, rng), B = random_matrix(kKTiles * 8, kCols, rng);
  const Smem sB = store_swizzled<kCols>(B);
  std::vector<std::vector<Acc>> acc(kMTiles, std::vector<Acc>(kCols / 8, Acc{}));
  for (int kk = 0; kk < kKTiles / 2; ++kk) {
    std::vector<Frag4> a(kMTiles);
    for (int mt = 0; mt < kMTiles; ++mt) {
      for (int l = 0; l < 32; ++l) {  // p[mt][nt][i] = P[16 mt + c_row][8 nt + c_col]
        auto p = [&](int nt, int i) { return P[16 * mt + c_row(l, i)][8 * nt + c_col(l, i)]; };
        a[mt][l][0] = {p(2 * kk, 0), p(2 * kk, 1)};
        a[mt][l][1] = {p(2 * kk, 2), p(2 * kk, 3)};
        a[mt][l][2] = {p(2 * kk + 1, 0), p(2 * kk + 1, 1)};
        a[mt][l][3] = {p(2 * kk + 1, 2), p(2 * kk + 1, 3)};
      }
    }
    for (int dp = 0; dp < kCols / 16; ++dp) {
      std::array<uint32_t, 32> addr;
      for (int l = 0; l < 32; ++l) {
        const LaneOffset ob = ldsm_b_trans(l);
        addr[l] = SwizzledLane<kCols, kElem>(0, ob.row, ob.col).at(kk * 16, dp * 16);
      }
      const Frag4 b = ldmatrix_x4(sB, addr, true);
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma(acc[mt][2 * dp], a[mt], b_half(b, 0));
        mma(acc[mt][2 * dp + 1], a[mt], b_half(b, 2));
      }
    }
  }
  std::vector<std::vector<double>> expect(kMTiles * 16, std::vector<double>(kCols, 0));
  for (int r = 0; r < kMTiles * 16; ++r)
    for (int n = 0; n < kCols; ++n)
      for (int k = 0; k < kKTiles * 8; ++k) expect[r][n] += double(P[r][k]) * B[k][n];
  check(acc_matches(acc, expect, 0, 0), "gemm_rs<" + std::to_string(kMTiles) + "," +
                                            std::to_string(kKTiles) + "," + std::to_string(kCols) +
                                            "> equals P B");
}

// The backward's dQ step: dQ[q][d] = sum_key dS^T[key][q] K[key][d], A read transposed from the
// (kBlockN x kBlockM) dS^T tile at the warp's query offset, B transposed from K at its column
// offset; plus the staging of dS^T from S^T-layout accumulators (rows = keys) into that tile.
template <int kBlockM, int kBlockN, int kHeadDim, int kDqCols>
void check_dq(std::mt19937& rng) {
  const Matrix dS = random_matrix(kBlockM, kBlockN, rng), K = random_matrix(kBlockN, kHeadDim, rng);
  Smem sdS(kBlockN * kBlockM);
  // Each warp owns 16 keys; its accumulators s[nt][i] hold dS^T[16 w + c_row][8 nt + c_col].
  for (int w = 0; w < kBlockN / 16; ++w)
    for (int nt = 0; nt < kBlockM / 8; ++nt)
      for (int l = 0; l < 32; ++l)
        for (int hh = 0; hh < 2; ++hh) {
          const int key = 16 * w + c_row(l, 2 * hh), q = 8 * nt + c_col(l, 0);
          const int off = swizzle<kBlockM>(key, q);  // one 32-bit store of (q, q+1)
          sdS.cells[off] = dS[q][key];
          sdS.cells[off + 1] = dS[q + 1][key];
        }
  const Smem sK = store_swizzled<kHeadDim>(K);
  bool ok = true;
  for (int q0 = 0; q0 < kBlockM; q0 += 16) {
    for (int c0 = 0; c0 < kHeadDim; c0 += kDqCols) {
      std::vector<std::vector<Acc>> acc(1, std::vector<Acc>(kDqCols / 8, Acc{}));
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        std::array<uint32_t, 32> addr_a;
        for (int l = 0; l < 32; ++l) {
          const LaneOffset oa = ldsm_a_trans(l);
          addr_a[l] = SwizzledLane<kBlockM, kElem>(0, oa.row, q0 + oa.col).at(kk * 16, 0);
        }
        const Frag4 a = ldmatrix_x4(sdS, addr_a, true);
        for (int dp = 0; dp < kDqCols / 16; ++dp) {
          std::array<uint32_t, 32> addr_b;
          for (int l = 0; l < 32; ++l) {
            const LaneOffset ob = ldsm_b_trans(l);
            addr_b[l] = SwizzledLane<kHeadDim, kElem>(0, ob.row, c0 + ob.col).at(kk * 16, dp * 16);
          }
          const Frag4 b = ldmatrix_x4(sK, addr_b, true);
          mma(acc[0][2 * dp], a, b_half(b, 0));
          mma(acc[0][2 * dp + 1], a, b_half(b, 2));
        }
      }
      std::vector<std::vector<double>> expect(kBlockM, std::vector<double>(kHeadDim, 0));
      for (int q = 0; q < kBlockM; ++q)
        for (int d = 0; d < kHeadDim; ++d)
          for (int key = 0; key < kBlockN; ++key) expect[q][d] += double(dS[q][key]) * K[key][d];
      std::vector<std::vector<double>> shifted(kBlockM, std::vector<double>(kDqCols));
      for (int q = 0; q < kBlockM; ++q)
        for (int d = 0; d < kDqCols; ++d) shifted[q][d] = expect[q][c0 + d];
      ok = ok && acc_matches(acc, shifted, q0, 0);
    }
  }
  check(ok, "dQ = dS K from the staged dS^T tile, BlockM " + std::to_string(kBlockM) +
                " HeadDim " + std::to_string(kHeadDim));
}

template <int kCols>
void check_swizzle(int rows) {
  std::set<int> seen;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kCols; ++c) seen.insert(swizzle<kCols>(r, c));
  check(int(seen.size()) == rows * kCols && *seen.begin() == 0 && *seen.rbegin() == rows * kCols - 1,
        "swizzle<" + std::to_string(kCols) + "> is a permutation of the tile");
  // Each 8-lane phase of every ldmatrix pattern reads 8 rows whose 16-byte chunks must fall in
  // 8 distinct 16-byte bank groups (128 bytes = all 32 banks): no bank conflict.
  bool conflict_free = true;
  LaneOffset (*patterns[])(int) = {ldsm_a, ldsm_a_trans, ldsm_b, ldsm_b_trans};
  for (auto pattern : patterns)
    for (int row0 = 0; row0 < rows; row0 += 16)
      for (int col0 = 0; col0 < kCols; col0 += 16)
        for (int phase = 0; phase < 4; ++phase) {
          std::set<int> groups;
          for (int l = 8 * phase; l < 8 * phase + 8; ++l) {
            const LaneOffset o = pattern(l);
            groups.insert((swizzle<kCols>(row0 + o.row, col0 + o.col) * kElem / 16) % 8);
          }
          conflict_free = conflict_free && groups.size() == 8;
        }
  check(conflict_free, "ldmatrix phases over swizzle<" + std::to_string(kCols) + "> are conflict-free");
}

template <int kCols>
void check_swizzled_lane() {
  bool ok = true;
  for (int extra_col = 0; extra_col < kCols; extra_col += 16)  // runtime column offsets (dQ)
    for (int l = 0; l < 32; ++l) {
      const LaneOffset o = ldsm_b_trans(l);
      const SwizzledLane<kCols, kElem> lane(1024, 3 + o.row, extra_col + o.col);
      for (int row0 = 0; row0 < 64; row0 += 8)
        for (int col0 = 0; extra_col + col0 < kCols; col0 += 16)
          ok = ok && lane.at(row0, col0) ==
                         1024u + kElem * swizzle<kCols>(3 + o.row + row0, extra_col + o.col + col0);
    }
  check(ok, "SwizzledLane<" + std::to_string(kCols) + ">::at equals the swizzle formula");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_swizzle<64>(128);
  check_swizzle<128>(128);
  check_swizzled_lane<64>();
  check_swizzled_lane<128>();
  // Forward S = Q K^T (4 warps x 32 rows), both buckets; backward S^T = K Q^T (16 keys a warp).
  check_gemm_nt<2, 8, 128>(128, 32, rng);
  check_gemm_nt<2, 16, 64>(128, 96, rng);
  check_gemm_nt<1, 8, 128>(128, 112, rng);
  check_gemm_nt<1, 16, 64>(128, 48, rng);
  // Forward O += P V; backward dV += P^T dO and dK += dS^T Q.
  check_gemm_rs<2, 8, 128>(rng);
  check_gemm_rs<2, 16, 64>(rng);
  check_gemm_rs<1, 8, 128>(rng);
  check_gemm_rs<1, 16, 64>(rng);
  check_dq<64, 128, 128, 64>(rng);
  check_dq<128, 128, 64, 64>(rng);
  std::printf("%d checks, %d failures\n", heteromem::testing::g_checks, heteromem::testing::g_failures);
  return heteromem::testing::exit_code();
}
