"""The torch engine: transformers models, varlen attention, torchrun + DeepSpeed / FSDP2.

peft imports torchao when it is installed (vltune installs it for `optim: adamw_torch_8bit`). On that
import torchao warns that its optional fp8 / cutlass kernel libraries do not load for this torch build,
and torch's pytree warns about torchao's enum registrations: neither concerns the 8-bit AdamW (plain
torch ops), and both would greet every run. Those two loggers are kept to errors.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
