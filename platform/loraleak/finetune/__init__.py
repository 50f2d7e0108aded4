"""The victim's side: DreamBooth-LoRA fine-tuning as the paper's victim does it, and LoRA file I/O.

Import from the submodules (`finetune.config`, `finetune.dreambooth_lora`, `finetune.lora_io`, ...):
`loraleak.generate` depends on `finetune.lora_io` and `finetune.class_images` on `loraleak.generate`,
so this package imports nothing eagerly.
"""
