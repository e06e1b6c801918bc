// The scalars of LoRA-Pro's fused moment pass, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

namespace fastlora {

struct LoraProScalars {
  double scale = 1.0;  // the layer's LoRA scale s: g = s (B gA0 + gB0 A)
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double bias_correction1 = 1.0, bias_correction2 = 1.0;  // 1 - beta^t
};

// Adam's per-element coefficients in the accumulation type, from the scalars in double: the one
// place both kernels get them from, so CPU and CUDA round them alike.
template <class Acc>
struct LoraProCoefficients {
  Acc scale, b1, c1, b2, c2, inv_bc1, inv_sqrt_bc2, eps;
};

template <class Acc>
LoraProCoefficients<Acc> lora_pro_coefficients(const LoraProScalars& s) {
  return {static_cast<Acc>(s.scale),
          static_cast<Acc>(s.beta1),
          static_cast<Acc>(1.0 - s.beta1),
          static_cast<Acc>(s.beta2),
          static_cast<Acc>(1.0 - s.beta2),
          static_cast<Acc>(1.0 / s.bias_correction1),
          static_cast<Acc>(1.0 / std::sqrt(s.bias_correction2)),
          static_cast<Acc>(s.eps)};
}

}  // namespace fastlora
