"""Which implementation computes each of fastlora's ops: the registry of implementations and
their switches (:mod:`.registry`), the layer's implementations and their choice per shape
(:mod:`.layer`), and measured dispatch (:mod:`.measured`). Import the submodules directly:
this package imports nothing itself, so low modules (``fastlora.ops``) can use the registry."""
