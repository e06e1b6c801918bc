"""Which implementation computes each of fastlora's ops: the registry of implementations and
their switches (:mod:`.registry`), the compiled ops in library ops where no kernel runs
(:mod:`.library`), the layer's implementations and their choice per shape (:mod:`.layer`), and
measured dispatch (:mod:`.measured`). Import the submodules directly: this package imports
nothing itself, so low modules (``fastlora._ops``) can use the registry."""
