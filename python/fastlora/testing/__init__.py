"""What tests, and users who want to check fastlora, use beside the library: the float64 oracle
(:mod:`fastlora.testing.reference`).

Importing this package registers the oracle as the layer's "reference" implementation, so that
``fastlora.use_backend("reference")`` runs the layer through it (ordinary autograd, for
comparisons and debugging). Production never imports it: automatic dispatch never chooses the
oracle.
"""

from __future__ import annotations

from ..backends.registry import Implementation, register
from . import reference

__all__ = ["reference"]

# validated=None: the oracle is correct by definition on every device type.
register(Implementation("reference", "linear", validated=None, fn=reference.lora_linear))
register(Implementation("reference", "update", validated=None, fn=reference.lora_update))
