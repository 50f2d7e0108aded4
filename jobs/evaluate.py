"""Evaluate a zoo's held-out victims as a Ray job (a rerun resumes: evaluated victims are kept).

    ray job submit --runtime-env runtime_env.yaml -- python jobs/evaluate.py evaluate.yaml [--zoo s3://bucket/zoo]
    python jobs/evaluate.py evaluate.yaml        # on this machine: starts a local Ray

Thin by design: the library does the work (`loraleak.evaluation.evaluate.evaluate`).
"""

import sys

from loraleak.evaluation.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:]))
