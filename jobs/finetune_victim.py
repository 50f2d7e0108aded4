"""Fine-tune one victim and check its leak, as a Ray job.

    ray job submit --working-dir . -- python jobs/finetune_victim.py configs/victim.yaml

Thin by design: the library does the work (`loraleak.victim.run_victim`).
"""

import sys

from loraleak.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
