"""Sweeps: the whole study (`run_pipeline`) over a search space, with Ray Tune and MLflow.

    config    SweepConfig: the base pipeline (a profile or a file), fixed overrides, the search space
              as dotted paths into PipelineConfig, grid or random, which stages may rerun, resources,
              concurrency, the metric; `load_sweep_config(path)`
    trials    the trials a sweep expands to (deterministic ids, labels, their PipelineConfigs)
    stages    which stage outputs trials share (the pipeline's own folder keys), waves, concurrency
    trainable the Ray Tune function: one trial = one `run_pipeline` and one nested MLflow run
    results   the per-trial records, the results table (CSV + printed) and the privacy-utility plot
    tracking  the sweep's MLflow experiment: its parent run, each trial's pipeline run nested under it
    run       run_sweep(cfg) -> SweepResult
    cli       `loraleak sweep tune_configs/X.yaml` (also `jobs/sweep.py` for `ray job submit`)

Import from the submodules: this package imports nothing heavy.
"""
