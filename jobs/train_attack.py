"""Train the attack over a LoRA zoo as a Ray job (a rerun with the same run_name resumes).

    ray job submit --runtime-env runtime_env.yaml -- python jobs/train_attack.py platform/loraleak/configs/attack-synthetic.yaml [--workers 4]
    python jobs/train_attack.py attack.yaml          # on this machine: starts a local Ray

Thin by design: the library does the work (`loraleak.attack.train.train_attack`).
"""

import sys

from loraleak.attack.cli import attack_main

if __name__ == "__main__":
    sys.exit(attack_main(["train", *sys.argv[1:]]))
