"""The victim's side: DreamBooth-LoRA fine-tuning as the paper's victim does it.

Import from the submodules (`finetune.config`, `finetune.dreambooth_lora`, `finetune.batched`, ...);
this package imports nothing eagerly. LoRA file I/O is the shared kernel's (`loraleak.lora.io`).
"""
