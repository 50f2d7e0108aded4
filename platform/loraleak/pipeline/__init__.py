"""The whole study in one call: identities -> base -> zoo -> attack -> baselines -> evaluation -> report.

    config   PipelineConfig (typed, nested; its stage sections derive from the stages' own configs),
             with_overrides(cfg, {"zoo.finetune.rank": 8})
    profiles the packaged configs (quick, lfw, paper)
    run      run_pipeline(cfg) -> PipelineResult (headline metrics, report, MLflow run ids per stage)
    cli      `loraleak run [--profile quick|lfw|paper] [--config FILE] [--out DIR] [--set KEY=VALUE]`

Import from the submodules (`loraleak.pipeline.run`, `.config`): this package imports nothing heavy.
"""
