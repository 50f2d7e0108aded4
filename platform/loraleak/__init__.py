"""loraleak: does sharing a LoRA fine-tune of a diffusion model leak the face it was trained on?

The package follows the pipeline: identities -> base -> finetune (victim) -> zoo -> attack ->
evaluation -> defenses/sweeps. Each subpackage has one job; `loraleak.cli` wires them to the
`loraleak` command.
"""

__version__ = "0.1.0"
