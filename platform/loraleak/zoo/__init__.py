"""The LoRA zoo: many victim fine-tunes built with Ray Data, their trajectory snapshots Δθ_r, and a
Parquet manifest (one row per snapshot) that later stages read.

    config    ZooConfig: identities, base, fine-tune settings and variants, defense, Ray workers and
              fine-tunes per UNet pass, MLflow; read_zoo_config(root): the config a zoo records
    plan      every fine-tune a config asks for, with its deterministic lora_id
    build     build_zoo(cfg): Ray Data actors fine-tune (K at once), write LoRA files, then manifest parts
    defense   the zoo's post-hoc defense, applied to every snapshot file before it is published
    manifest  the Parquet schema; parts, compaction, what is finished
    storage   the root's layout, through pyarrow filesystems (local path, s3://, ...)
    inspect   zoo_info(root), verify_zoo(root)
    reader    iter_zoo_samples(root), zoo_dataset(root): (Δθ_r, r, identity, image keys)
    cli       `loraleak zoo build | info | verify`

Import from the submodules; this package imports nothing heavy (no Ray, no torch) by itself.
"""
