// Run-time dispatch of every CPU optimizer core (Adam, AGD, 8-bit Adam) to the path the
// caller chose; the paths themselves are in cores_<capability>.cpp.
#include "adam8bit_core.h"
#include "adam_core.h"

namespace heteromem::cpu {

namespace {

template <class Buffers, class Scalars>
using Loop = void (*)(const Buffers&, const Scalars&, int64_t, int64_t);

template <class Buffers, class Scalars>
void dispatch(const Buffers& buffers, const Scalars& scalars, int64_t begin, int64_t end,
              Capability capability, Loop<Buffers, Scalars> scalar, Loop<Buffers, Scalars> avx2,
              Loop<Buffers, Scalars> avx512) {
  if (begin >= end) return;
  require_capability(capability);
  switch (capability) {
    case Capability::kAvx512:
      return avx512(buffers, scalars, begin, end);
    case Capability::kAvx2:
      return avx2(buffers, scalars, begin, end);
    case Capability::kScalar:
      return scalar(buffers, scalars, begin, end);
  }
}

}  // namespace

void adam_update(const AdamBuffers& buffers, const AdamScalars& scalars, int64_t begin,
                 int64_t end, Capability capability) {
  dispatch(buffers, scalars, begin, end, capability, adam_update_scalar, adam_update_avx2,
           adam_update_avx512);
}

void agd_update(const AdamBuffers& buffers, const AgdScalars& scalars, int64_t begin,
                int64_t end, Capability capability) {
  dispatch(buffers, scalars, begin, end, capability, agd_update_scalar, agd_update_avx2,
           agd_update_avx512);
}

void adam8bit_update(const Adam8bitBuffers& buffers, const AdamScalars& scalars, int64_t begin,
                     int64_t end, Capability capability) {
  dispatch(buffers, scalars, begin, end, capability, adam8bit_update_scalar,
           adam8bit_update_avx2, adam8bit_update_avx512);
}

}  // namespace heteromem::cpu
