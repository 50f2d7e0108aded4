"""One writer per output folder: a second `loraleak run` / `zoo build` / `attack train` / `evaluate` on a
folder in use stops at once with one line naming the holder; a lock left by a killed process is taken over.

The holders are real processes (the lock is per process); the second writers are the real CLI, stopped by
the lock before any work.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loraleak.cli import main
from loraleak.locking import LOCK_FILE, FolderInUseError, folder_lock, holds_lock, read_holder

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")

# A stand-in for a stage: take the folder's lock, record that it ran, hold it until `release` appears.
WORKER = """
import sys, time
from pathlib import Path
from loraleak.errors import LoraleakError
from loraleak.locking import folder_lock
folder, release, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
try:
    with folder_lock(folder, "stand-in " + tag):
        with open(folder / "ran", "a") as f:
            f.write(tag + "\\n")
        print("holding", flush=True)
        deadline = time.time() + 60
        while not release.exists() and time.time() < deadline:
            time.sleep(0.05)
except LoraleakError as e:
    print(f"loraleak: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _start(folder: Path, release: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": PLATFORM + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(release), tag], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_holding(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read()


def test_two_processes_on_one_folder_exactly_one_proceeds(tmp_path):
    folder, release = tmp_path / "out", tmp_path / "release"
    procs = [_start(folder, release, tag) for tag in ("a", "b")]  # racing for the lock
    deadline = time.time() + 60
    while not any(p.poll() is not None for p in procs) and time.time() < deadline:
        time.sleep(0.05)  # the loser exits at once, while the winner holds the lock
    release.touch()
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    assert len((folder / "ran").read_text().split()) == 1  # exactly one ran its critical section
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    _, _, err = next(r for r in results if r[0] == 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraleak: error: ")
    assert f"pid {procs[winner].pid} on {socket.gethostname()}, started " in lines[0] and "in use" in lines[0]


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another live process holds; yields (folder, holder's pid)."""
    folder, release = tmp_path / "held", tmp_path / "release"
    proc = _start(folder, release, "holder")
    _wait_holding(proc)
    yield folder, proc.pid
    release.touch()
    proc.wait(timeout=60)


def _one_line_refusal(capsys, argv, pid):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {pid} on {socket.gethostname()}" in err[0] and "in use" in err[0], err


def test_every_writing_command_refuses_a_folder_in_use(held, tmp_path, capsys):
    folder, pid = held
    # Settings that would fail fast after the lock (too few held-out identities) if the lock let it through.
    _one_line_refusal(capsys, ["run", "--out", str(folder), "--set", "identities.num_identities=2"], pid)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"root": str(folder), "base": "tiny", "tracking": False,
                                   "identities": {"kind": "synthetic", "num_identities": 2},
                                   "finetune": {"steps": 1}, "num_snapshots": 1}))
    _one_line_refusal(capsys, ["zoo", "build", str(zoo)], pid)
    attack = tmp_path / "attack.yaml"
    attack.write_text(yaml.safe_dump({"zoo": str(tmp_path / "somezoo"), "out_dir": str(folder), "tracking": False}))
    _one_line_refusal(capsys, ["attack", "train", str(attack)], pid)
    evaluation = tmp_path / "evaluation.yaml"
    evaluation.write_text(yaml.safe_dump({"zoo": str(tmp_path / "somezoo"), "out_dir": str(folder),
                                          "tracking": False}))
    _one_line_refusal(capsys, ["evaluate", str(evaluation)], pid)
    assert not (folder / "mlflow.db").exists() and sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, "ran"]


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "out"
    proc = _start(folder, tmp_path / "never", "killed")
    _wait_holding(proc)
    with pytest.raises(FolderInUseError, match=f"pid {proc.pid} "):
        with folder_lock(folder):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert read_holder(folder)["pid"] == proc.pid  # its record is still there; its flock is not
    with folder_lock(folder, "taker"):
        assert read_holder(folder)["pid"] == os.getpid() and read_holder(folder)["command"] == "taker"
        assert holds_lock(folder)
        with folder_lock(folder):  # reentrant within one process: a stage inside the pipeline's lock
            pass
        assert holds_lock(folder)
    assert not holds_lock(folder)
    json.loads((folder / LOCK_FILE).read_text())


def test_a_rerun_closes_the_mlflow_runs_a_killed_run_left_running(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from loraleak.pipeline.tracking import STUDY_TAG
    from loraleak.tracking import default_tracking_uri, mlflow_run

    out = tmp_path / "out"  # its store is the one shared by the studies in tmp_path
    with mlflow_run("out", "finished", workdir=tmp_path):
        pass
    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("out").experiment_id
    orphan = client.create_run(experiment, run_name="killed -9", tags={STUDY_TAG: str(out.resolve())})
    other = client.create_run(experiment, run_name="another study's, live", tags={STUDY_TAG: str(tmp_path / "b")})
    # The real command, stopped after taking the folder's lock by too few held-out identities.
    assert main(["run", "--out", str(out), "--set", "identities.num_identities=2"]) == 2
    assert "held-out" in capsys.readouterr().err
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    assert statuses == {"finished": "FINISHED", "killed -9": "KILLED", "another study's, live": "RUNNING",
                        f"out-{plan_key(out)}": "FAILED"}  # this run itself failed, after closing the orphan
    assert orphan.info.status == other.info.status == "RUNNING"


def plan_key(out):
    from loraleak.pipeline.cli import load_pipeline_config
    from loraleak.pipeline.stages import stage_keys

    return stage_keys(load_pipeline_config(out=out, assignments=["identities.num_identities=2"]))["evaluation"]