"""Saving and loading adapters, and PEFT interoperability.

- :func:`save_adapter` / :func:`load_adapter` (:mod:`.native`): fastlora's own format, one
  ``adapter_model.safetensors`` whose metadata holds the per-layer configuration (rank, alpha,
  scale mode, dropout, init method), plus a readable copy of it in ``fastlora_config.json``.
- :func:`export_peft` / :func:`import_peft` (:mod:`.peft`): PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` on the original
  base model.

Both write through :mod:`.files`: every write builds the whole directory next to the target and
swaps it in atomically, so a crash at any point leaves the previous adapter intact and loadable;
it replaces the adapter files of every format, so no earlier save's file outlives it. Every load
reads all its files from one save, and checks everything (:mod:`.checks`, :mod:`.heads`), heads and
values in the dtypes they end in included, before changing the model, which afterwards computes
its fresh base plus the loaded adapter. See docs/adapters.md.

Modules, lowest first: ``files`` (directory writes, consistent reads, safetensors bytes),
``checks`` (validation both formats share), ``heads`` (modules_to_save and parameters trained in
place), ``native`` and ``peft`` (the two formats).
"""

from .files import (ADAPTER_FILES, CONFIG, HF_WEIGHTS, PEFT_CONFIG, READ_ATTEMPTS, RESUME_MARK, RESUME_WEIGHTS, WEIGHTS,
                    AdapterFormatError, save_safetensors, write_directory)
from .native import BASE_WEIGHTS, FORMAT, VERSION, fastlora_state, load_adapter, save_adapter
from .peft import (PEFT_PLAIN_INITS, PEFT_PREFIX, PEFT_PRINCIPAL_INITS, PEFT_UNSUPPORTED, TASK_TYPES, export_peft,
                   import_peft, infer_task_type, peft_state)

__all__ = ["save_adapter", "load_adapter", "export_peft", "import_peft", "AdapterFormatError", "infer_task_type"]
