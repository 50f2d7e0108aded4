"""The shared LoRA kernel: what every stage that touches a LoRA file or a LoRA'd UNet uses.

- `io`: the LoRA file format and the loading gate (`read_lora`: safetensors only, sane values,
  paired factors, stated ranks; `check_lora_fits` adds a base's shapes).
- `formats`: shared LoRAs as they are published (diffusers, PEFT folder, kohya), read through the gate.
- `batched`: many LoRAs in one UNet pass (`BatchedLoRALinear`), per sample its own LoRA: the
  batched fine-tune trains through it and the attack decodes through it.

It depends on nothing of the stages (`errors` only), so fine-tuning, the attacks, the evaluation,
the defenses and the zoo all import from here and never from one another for LoRA plumbing.
Import from the submodules (`loraleak.lora.io`, ...): this package imports nothing eagerly.
"""
