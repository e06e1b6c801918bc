// Run-time choice among the per-instruction-set builds of lora_cpu_kernels.cpp.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "lora_cpu.h"

namespace fastlora::cpu {

namespace baseline {
const KernelTable* kernel_table();
}
#if defined(FASTLORA_X86_ISAS)
namespace avx2 {
const KernelTable* kernel_table();
}
namespace avx512 {
const KernelTable* kernel_table();
}
#endif

namespace {

// nullptr if the name is unknown or this CPU cannot run that build.
const KernelTable* table_for(const char* name) {
#if defined(FASTLORA_X86_ISAS)
  // The builds use -march=x86-64-v4 / -v3, so check the whole level, not single features.
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("x86-64-v4");
  const bool has_avx2 = __builtin_cpu_supports("x86-64-v3");
  if (std::strcmp(name, "auto") == 0)
    return has_avx512 ? avx512::kernel_table() : has_avx2 ? avx2::kernel_table()
                                                          : baseline::kernel_table();
  if (std::strcmp(name, "avx512") == 0) return has_avx512 ? avx512::kernel_table() : nullptr;
  if (std::strcmp(name, "avx2") == 0) return has_avx2 ? avx2::kernel_table() : nullptr;
#else
  if (std::strcmp(name, "auto") == 0) return baseline::kernel_table();
#endif
  if (std::strcmp(name, "baseline") == 0) return baseline::kernel_table();
  return nullptr;
}

const KernelTable* initial_table() {
  // FASTLORA_CPU_ISA pins the build (e.g. to compare them); unknown values fall back to auto.
  const char* env = std::getenv("FASTLORA_CPU_ISA");
  const KernelTable* t = env ? table_for(env) : nullptr;
  return t ? t : table_for("auto");
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

}  // namespace

const KernelTable& kernels() { return *current().load(std::memory_order_relaxed); }

bool select_isa(const char* name) {
  const KernelTable* t = table_for(name);
  if (t == nullptr) return false;
  current().store(t, std::memory_order_relaxed);
  return true;
}

}  // namespace fastlora::cpu
