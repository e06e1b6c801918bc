// The scalars of LoRA-Pro's fused moment pass, shared by the CPU and CUDA kernels.
#pragma once

namespace fastlora {

struct LoraProScalars {
  double scale = 1.0;  // the layer's LoRA scale s: g = s (B gA0 + gB0 A)
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double bias_correction1 = 1.0, bias_correction2 = 1.0;  // 1 - beta^t
};

}  // namespace fastlora
