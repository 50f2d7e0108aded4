"""Build a LoRA zoo as a Ray job (a rerun of the same config resumes: finished fine-tunes are kept).

    ray job submit --runtime-env runtime_env.yaml -- python jobs/build_zoo.py platform/loraleak/configs/zoo-synthetic.yaml [--root s3://bucket/zoo]
    python jobs/build_zoo.py platform/loraleak/configs/zoo-synthetic.yaml   # on this machine: starts a local Ray

Thin by design: the library does the work (`loraleak.zoo.build.build_zoo`).
"""

import sys

from loraleak.zoo.cli import zoo_main

if __name__ == "__main__":
    sys.exit(zoo_main(["build", *sys.argv[1:]]))
