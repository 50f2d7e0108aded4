"""`loraleak attack train CONFIG` and `loraleak attack reconstruct --attack DIR --lora FILE --out DIR`.

`add_attack_commands(subparsers)` adds the `attack` command to the `loraleak` parser; `attack_main(argv)`
runs the same commands on their own (what `jobs/train_attack.py` calls).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..command import stage_main



def cmd_attack_train(args: argparse.Namespace) -> None:
    from .train import load_train_config, train_attack

    overrides = {k: v for k, v in (("zoo", args.zoo), ("out_dir", args.out), ("max_steps", args.max_steps),
                                   ("num_workers", args.workers)) if v is not None}
    result = train_attack(load_train_config(args.config, overrides))
    print(json.dumps({"attack_dir": str(result.attack_dir), "step": result.step, "start_step": result.start_step,
                      "evaluation": result.evaluations.get(result.step), "checkpoint": result.checkpoint_path,
                      "mlflow_run_id": result.mlflow_run_id}, indent=2))


def cmd_attack_reconstruct(args: argparse.Namespace) -> None:
    from .reconstruct import reconstruct

    result = reconstruct(args.attack, args.lora, base=args.base, out_dir=args.out, n=args.n, seed=args.seed,
                         step=args.step, guidance_scale=args.guidance, num_inference_steps=args.steps,
                         device=args.device)
    for note in result.notes:
        print(f"note: {note}")
    trigger = f", trigger {result.trigger!r}" if result.trigger else ""
    print(f"wrote {len(result.images)} images and {result.grid} (LoRA step r={result.step}, from "
          f"{result.step_source}{trigger})")


def add_attack_commands(subparsers: argparse._SubParsersAction) -> None:
    attack = subparsers.add_parser("attack", help="the attack: train it over a zoo (Ray Train), reconstruct a "
                                                  "face from a LoRA").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = attack.add_parser("train", help="train the attack on a zoo's attack_train LoRAs (a rerun resumes)")
    p.add_argument("config", type=Path, help="YAML AttackTrainConfig")
    p.add_argument("--zoo", help="zoo root, a path or URI (overrides zoo)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--max-steps", type=int, help="overrides max_steps (a larger one continues a finished run)")
    p.add_argument("--workers", type=int, help="Ray Train workers (overrides num_workers)")
    p.set_defaults(func=cmd_attack_train)
    p = attack.add_parser("reconstruct", help="images of the person a shared LoRA file was fine-tuned on")
    p.add_argument("--attack", type=Path, required=True, help="a trained attack (out_dir/attack)")
    p.add_argument("--lora", type=Path, required=True,
                   help="the shared LoRA: a .safetensors file (diffusers or kohya), a folder holding "
                        "pytorch_lora_weights.safetensors, or a PEFT adapter folder")
    p.add_argument("--out", type=Path, required=True, help="output folder for the images")
    p.add_argument("--base", help="base model (default: the one the attack was trained with)")
    p.add_argument("--step", type=int, help="the LoRA's fine-tuning steps r (default: from its folder, metadata "
                                            "or finetune.json, else the attack zoo's fine-tune length)")
    p.add_argument("--n", type=int, default=8, help="images to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_attack_reconstruct)


def attack_main(argv: list[str] | None = None) -> int:
    """`loraleak attack ...` on its own: one line on stderr and exit code 2 for a user-facing error."""
    return stage_main(add_attack_commands, ["attack", *(sys.argv[1:] if argv is None else argv)])
