// Portable paths of every CPU optimizer core: any x86-64 or other CPU. Also the reference
// the SIMD paths must match bit for bit.
#include "adam_core_tail.h"
#include "adam8bit_core_tail.h"

namespace heteromem::cpu {

void adam_update_scalar(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_elements(b, s, begin, end);
}

void agd_update_scalar(const AdamBuffers& b, const AgdScalars& s, int64_t begin, int64_t end) {
  agd_elements(b, s, begin, end);
}

void adam8bit_update_scalar(const Adam8bitBuffers& b, const AdamScalars& s, int64_t begin,
                            int64_t end) {
  for (int64_t start = begin; start < end; start += quant8::kBlock) {
    adam8bit_block_scalar(b, s, start, std::min(start + quant8::kBlock, end));
  }
}

}  // namespace heteromem::cpu
