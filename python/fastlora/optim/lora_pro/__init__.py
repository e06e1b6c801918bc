"""The LoRA-Pro optimizers (docs/lora_pro.md), by concept, each module importing only those above
it in this list:

- :mod:`.discovery`: the trainable LoRA layers of a model, their sharding checks, and the stacks
  of same-shaped layers the closed form runs on;
- :mod:`.state`: the moments' layout and checkpoint (de)serialisation;
- :mod:`.base`: the optimizer base: the step, finiteness checks, applying directions, logging;
- :mod:`.optimizers`: :class:`LoRAPro` (AdamW, full or efficient mode) and :class:`LoRAProSGD`.

The closed form itself is :mod:`fastlora.optim.closed_form`.
"""

from .optimizers import DEFAULT_TRUST_REGION, MODES, MOMENT_DTYPES, LoRAPro, LoRAProSGD

__all__ = ["DEFAULT_TRUST_REGION", "MODES", "MOMENT_DTYPES", "LoRAPro", "LoRAProSGD"]
