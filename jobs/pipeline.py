"""The whole study as a Ray job (a rerun resumes: complete stages are skipped).

    ray job submit --runtime-env runtime_env.yaml -- python jobs/pipeline.py --profile paper --out /shared/studies/paper
    (--out: a path every node sees, e.g. an NFS/EFS mount; s3:// is refused, see README "Running on a cluster")
    python jobs/pipeline.py --out runs/quick     # on this machine: starts a local Ray

Thin by design: the library does the work (`loraleak.pipeline.run.run_pipeline`).
"""

import sys

from loraleak.pipeline.cli import pipeline_main

if __name__ == "__main__":
    sys.exit(pipeline_main(sys.argv[1:]))
