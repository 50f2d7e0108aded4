"""A sweep of the whole study as a Ray job (a rerun resumes: finished trials are not run again).

    ray job submit --runtime-env runtime_env.yaml -- python jobs/sweep.py tune_configs/rank.yaml --out /shared/sweeps/rank
    python jobs/sweep.py tune_configs/rank.yaml     # on this machine: starts a local Ray

Thin by design: the library does the work (`loraleak.sweeps.run.run_sweep`).
"""

import sys

from loraleak.sweeps.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main(sys.argv[1:]))
