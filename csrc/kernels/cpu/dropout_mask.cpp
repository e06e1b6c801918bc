// The dropout keep-mask itself, for tests and for users who want to inspect it.
#include "lora_cpu.h"

namespace fastlora::cpu {

void dropout_mask(const DropoutParams& drop, int64_t begin, int64_t end, bool* mask) {
  for (int64_t i = begin; i < end; ++i)
    mask[i] = !drop.enabled || dropout_keep(drop.key, drop.threshold, static_cast<uint64_t>(i));
}

}  // namespace fastlora::cpu
