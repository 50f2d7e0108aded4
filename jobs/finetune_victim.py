"""Fine-tune one victim and check its leak, as a Ray job.

    ray job submit --runtime-env runtime_env.yaml -- python jobs/finetune_victim.py platform/loraleak/configs/victim-synthetic.yaml

Thin by design: the library does the work (`loraleak.victim.run_victim`).
"""

import sys

from loraleak.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
