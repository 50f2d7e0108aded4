"""Kill -9 and concurrency against the real command: a tiny study (`loraleak run` in a subprocess) is killed
during the zoo, during the attack and during the evaluation, rerun to completion, and its zoo manifest and
evaluation metrics equal an uninterrupted run's; two runs on one folder at once: exactly one proceeds, the
other stops with one line naming the holder, and the result equals a single run's.

Each run is the real CLI with its own local Ray (RAY_TMPDIR: a session folder of this module's, so no
other Ray instance of the machine is joined, and its processes can be found, and must be gone, afterwards).
About 4 minutes on a busy 2-core machine.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from loraleak.base.tiny import build_tiny_pipeline
from loraleak.leftovers import RAY_SNAPSHOT, checkpoint_folders, complete_checkpoints, is_temporary
from studies import SMALLEST, TINY, processes_naming

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# The zoo's steps and the attack's are raised from SMALLEST's (4 and 2) so that each stage lasts long enough
# to be killed in its middle (a few seconds each); the rest is test_pipeline's CI study.
STUDY = {**SMALLEST,
         "identities": {**SMALLEST["identities"], "num_identities": 4},  # 2 held out
         "zoo": {**SMALLEST["zoo"], "finetune": {**SMALLEST["zoo"]["finetune"], "steps": 40}},
         "attack": {**SMALLEST["attack"], "max_steps": 40, "checkpoint_every": 4, "val_every": 40},
         "baselines": [{"name": "nearest_neighbour", "kind": "nearest_neighbour"}],
         "evaluation": {**SMALLEST["evaluation"], "n_images": 1, "controls": ["victim_class_prompt"]}}
VARYING = ("started_at", "wall_time_s", "worker")  # manifest columns that say when and where, not what


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, environment of a run, the Ray session folder); the Ray processes are checked at the end."""
    work = tmp_path_factory.mktemp("faults")
    build_tiny_pipeline(TINY).save_pretrained(work / "base", safe_serialization=True)
    config = work / "study.yaml"
    config.write_text(yaml.safe_dump({**STUDY, "base": {"ref": str(work / "base")}}))
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_dir, PYTHONPATH=f"{REPO / 'platform'}{os.pathsep}{env.get('PYTHONPATH', '')}")
    yield config, env, ray_dir
    left = processes_naming(ray_dir, wait_s=30)
    for p in left:
        p.kill()
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert left == [], f"Ray processes left by the runs: {left}"


def start(setup, out: Path, log: Path) -> subprocess.Popen:
    config, env, _ = setup
    return subprocess.Popen([sys.executable, "-m", "loraleak.cli", "run", "--config", str(config), "--out", str(out)],
                            env=env, stdout=log.open("w"), stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def kill_when(proc: subprocess.Popen, appeared, what: str, timeout: float = 300) -> None:
    """kill -9 the run as soon as `appeared()` (its stage's first files) is true."""
    deadline = time.monotonic() + timeout
    while not appeared():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def one(out: Path, pattern: str) -> list[Path]:
    return sorted(out.glob(pattern))


def result(out: Path) -> tuple[list[dict], dict]:
    """The zoo manifest (without when/where columns, the out folder's path written as OUT) and the metrics.
    Each LoRA is compared by its recorded `lora_sha256`, the hash of its file's bytes (checked against the
    file here): `lora.io.save_lora_file` writes the same bytes for the same LoRA in any process."""
    (manifest,) = one(out, "zoo-*/manifest.parquet")
    rows = pq.read_table(manifest).drop_columns(list(VARYING)).to_pylist()
    for row in rows:
        assert hashlib.sha256((manifest.parent / row["lora_path"]).read_bytes()).hexdigest() == row["lora_sha256"]
    text = json.dumps(sorted(rows, key=lambda r: (r["lora_id"], r["snapshot_step"])), default=str)
    return json.loads(text.replace(str(out.resolve()), "OUT")), json.loads((out / "pipeline.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, err = finish(start(setup, out, out.parent / "run.log"))
    assert code == 0, err
    return result(out)


def no_leftovers(out: Path) -> None:
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]
    for run in one(out, "attack-*/ray/*"):
        assert complete_checkpoints(run) == checkpoint_folders(run) != []


def test_killed_during_the_zoo_the_attack_and_the_evaluation_a_rerun_ends_as_an_uninterrupted_run(
        setup, uninterrupted, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"

    # During the zoo: the first fine-tune recorded, the others not.
    kill_when(start(setup, out, log), lambda: one(out, "zoo-*/parts/*.parquet"), "zoo part")
    assert not one(out, "zoo-*/manifest.parquet") and len(one(out, "zoo-*/parts/*.parquet")) < 4

    # During the attack: its first checkpoint registered by Ray Train, the training not over.
    kill_when(start(setup, out, log), lambda: one(out, f"attack-*/ray/*/{RAY_SNAPSHOT}"), "attack checkpoint")
    assert one(out, "zoo-*/manifest.parquet") and not one(out, "attack-*/attack/training.json")

    # During the evaluation: the first victim's record written, the evaluation not over.
    kill_when(start(setup, out, log), lambda: one(out, "evaluation-*/victims/*.json"), "victim record")
    assert one(out, "attack-*/attack/training.json") and not one(out, "evaluation-*/evaluation.json")

    code, err = finish(start(setup, out, log))
    assert code == 0, err
    assert result(out) == uninterrupted
    no_leftovers(out)


def test_two_runs_on_one_folder_exactly_one_proceeds_and_the_result_is_a_single_runs(setup, uninterrupted, tmp_path):
    out = tmp_path / "out"
    procs = [start(setup, out, tmp_path / f"run{i}.log") for i in range(2)]
    ended = [finish(p) for p in procs]
    assert sorted(code for code, _ in ended) == [0, 2], ended
    winner = procs[[code for code, _ in ended].index(0)]
    _, err = next(e for e in ended if e[0] == 2)
    errors = [line for line in err.splitlines() if line.startswith("loraleak:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert f"pid {winner.pid} on " in errors[0] and "in use" in errors[0], errors
    assert result(out) == uninterrupted
    no_leftovers(out)
