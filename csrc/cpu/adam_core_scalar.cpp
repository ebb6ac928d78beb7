// Portable path: any x86-64 or other CPU. Also the reference the SIMD paths must match.
#include "adam_core_tail.h"

namespace heteromem::cpu {

void adam_update_scalar(const AdamBuffers& buffers, const AdamScalars& scalars, int64_t begin,
                        int64_t end) {
  adam_elements(buffers, scalars, begin, end);
}

}  // namespace heteromem::cpu
