"""loraleak: does sharing a LoRA fine-tune of a diffusion model leak the face it was trained on?

The package follows the pipeline: identities -> base -> finetune (victim) -> zoo -> attack ->
evaluation -> defenses/sweeps. Each subpackage has one job; `loraleak.cli` wires them to the
`loraleak` command.
"""

__version__ = "0.1.0"

# The study as a library call (loraleak.pipeline.api), imported on first use: `import loraleak` stays light.
__all__ = ["load_pipeline_config", "run_study", "__version__"]


def __getattr__(name: str):
    if name in ("load_pipeline_config", "run_study"):
        from .pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'loraleak' has no attribute {name!r}")
