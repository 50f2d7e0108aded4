"""Audit shared LoRA files for identity leakage without the private photos: `run.run_audit`, the
`loraleak audit` command in `cli`."""
