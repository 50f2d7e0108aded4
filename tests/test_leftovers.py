"""What a killed run leaves half-written is removed on resume (loraleak.leftovers), and nothing else is.

Real folders as the writers name them (zoo/storage.py, finetune/class_images.py, attack/train.py,
evaluation/evaluate.py) and Ray Train's own checkpoint record, written by Ray's own classes.
"""

import json
from pathlib import Path

import torch

from loraleak.cli import main
from loraleak.leftovers import (RAY_SNAPSHOT, complete_checkpoints, is_temporary, registered_checkpoints,
                                remove_study_leftovers, remove_unregistered_checkpoints)
from loraleak.locking import LOCK_FILE
from loraleak.pipeline.stages import latest_checkpoint


def ray_snapshot(run_dir: Path, kept: list[str], latest: str | None = None) -> None:
    """checkpoint_manager_snapshot.json as Ray Train V2 writes it, for the checkpoints `kept`."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (_CheckpointManagerState,
                                                                                 _TrainingResultState)

    results = [_TrainingResultState(checkpoint_dir_name=name, metrics={"step": i}) for i, name in enumerate(kept)]
    latest_result = _TrainingResultState(checkpoint_dir_name=latest or kept[-1], metrics={}) if kept else None
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(kept))),
        latest_checkpoint_result=latest_result, pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(kept), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RAY_SNAPSHOT).write_text(state.model_dump_json())


def checkpoint(run_dir: Path, name: str, step: int) -> Path:
    folder = run_dir / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    torch.save({"step": step}, folder / "trainer.pt")
    return folder


def touch(path: Path, directory: bool = False) -> Path:
    if directory:
        path.mkdir(parents=True)
        (path / "file").write_text("x")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    return path


def stage_folder(out: Path, name: str) -> Path:
    return touch(out / name / LOCK_FILE).parent


def killed_study(out: Path) -> tuple[set[Path], set[Path]]:
    """A study folder as kill -9 leaves it in every stage; returns (what must go, what must stay)."""
    gone, kept = set(), set()
    touch(out / LOCK_FILE)
    gone.add(touch(out / ".pipeline.json.tmp-123-abcd1234"))
    kept.add(touch(out / "pipeline.json"))

    zoo = stage_folder(out, "zoo-e583c7f2")
    kept |= {touch(zoo / "zoo_config.json"), touch(zoo / "parts" / "aaaa.parquet"), touch(zoo / "loras" / "aaaa", True)}
    gone.add(touch(zoo / "parts" / ".bbbb.parquet.tmp-123-abcd1234"))  # a part being written
    gone.add(touch(zoo / "loras" / ".stage-cccc-123-abcd1234", True))  # a fine-tune being staged
    gone.add(touch(zoo / "loras" / "dddd", True))  # published, its part never written
    gone.add(touch(zoo / ".manifest.parquet.tmp-123-abcd1234"))
    kept.add(touch(zoo / "class_images" / "a-human-face-4-0123456789abcdef", True))
    gone.add(touch(zoo / "class_images" / ".a-human-face-4-0123456789abcdef.tmp-123-abcd1234", True))

    attack = stage_folder(out, "attack-b7ad1d6c")
    kept |= {touch(attack / "attack_line.json"), touch(attack / "attack", True)}
    gone.add(touch(attack / ".attack-k2j4h5", True))  # an export being staged
    run = attack / "ray" / "attack-b7ad1d6c"
    kept |= {checkpoint(run, "checkpoint_2026-12-06_10-00-00.000001", 2),
             checkpoint(run, "checkpoint_2026-12-06_10-00-01.000001", 4)}
    gone.add(checkpoint(run, "checkpoint_2026-12-06_10-00-02.000001", 6))  # being uploaded: not registered
    gone.add(checkpoint(run, "checkpoint_2026-12-06_09-59-59.000001", 0))  # dropped by Ray, its deletion cut short
    ray_snapshot(run, ["checkpoint_2026-12-06_10-00-00.000001", "checkpoint_2026-12-06_10-00-01.000001"])

    evaluation = stage_folder(out, "evaluation-2ef1e835")
    kept |= {touch(evaluation / "victims" / "v1.json"), touch(evaluation / "victims" / "v1", True)}
    gone.add(touch(evaluation / "victims" / "v2", True))  # images in place, the record never written
    gone.add(touch(evaluation / "victims" / ".v3.tmp-abcd1234", True))
    gone.add(touch(evaluation / "victims" / ".v1.json.tmp-abcd1234"))

    # Not a stage folder (no lock file: loraleak never wrote it): left alone whatever it holds.
    kept |= {touch(out / "notes" / "loras" / "eeee", True), touch(out / "notes" / ".draft.tmp-1-x")}
    return gone, kept


def test_a_killed_studys_half_written_folders_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    gone, kept = killed_study(out)
    removed = remove_study_leftovers(out)
    assert set(removed) == gone
    assert all(not p.exists() for p in gone) and all(p.exists() for p in kept)
    assert remove_study_leftovers(out) == []  # nothing left to remove


def test_only_registered_checkpoints_are_complete_and_the_latest_is_one_of_them(tmp_path):
    attack = tmp_path / "attack-1"
    run = attack / "ray" / "attack-1"
    first = checkpoint(run, "checkpoint_a", 2)
    assert registered_checkpoints(run) == set() and complete_checkpoints(run) == []  # no snapshot: none yet
    assert latest_checkpoint(attack) is None  # a first checkpoint being uploaded is not one to continue from
    ray_snapshot(run, ["checkpoint_a"])
    partial = checkpoint(run, "checkpoint_b", 4)  # a later one, complete on disk, Ray never registered it
    assert latest_checkpoint(attack) == (first, 2)
    assert remove_unregistered_checkpoints(run) == [partial] and not partial.exists() and first.exists()

    (run / RAY_SNAPSHOT).write_text('{"checkpoint_results": [')  # cut short: nothing can be said
    assert registered_checkpoints(run) is None
    later = checkpoint(run, "checkpoint_c", 6)
    assert remove_unregistered_checkpoints(run) == [] and later.exists()


def test_temporary_names():
    for name in (".stage-abc-12-deadbeef", ".attack-x1y2", ".manifest.parquet.tmp-12-deadbeef",
                 ".a-human-face-4-0123.tmp-12-deadbeef", ".v1.json.tmp-deadbeef"):
        assert is_temporary(name), name
    for name in ("stage-abc", "attack", "manifest.parquet", ".loraleak.lock", "checkpoint_1", "tmp-1", ".hidden"):
        assert not is_temporary(name), name


def test_loraleak_run_removes_them_on_resume(tmp_path, capsys):
    out = tmp_path / "out"
    gone, kept = killed_study(out)
    # The real command, stopped after taking the folder's lock by too few held-out identities.
    assert main(["run", "--out", str(out), "--set", "identities.num_identities=2"]) == 2
    assert "held-out" in capsys.readouterr().err
    assert all(not p.exists() for p in gone) and all(p.exists() for p in kept)
    assert json.loads((out / LOCK_FILE).read_text())["pid"]  # it held the lock while removing them
