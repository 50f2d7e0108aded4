"""The LoRA zoo: Ray Data build, resume, failed rows, manifest schema, verify, info, reader, MLflow,
K fine-tunes per UNet pass, the recorded config, post-hoc defenses.

One local Ray (2 CPUs) and one randomly initialised tiny base serve the whole module; the zoo is
3 synthetic identities x 4-step fine-tunes with snapshots at r = 0, 2, 4. The reference zoo and the
killed build run through Ray Data; the other builds run their fine-tunes in-process (`workers: 0`,
the same worker code), since each Ray actor pool costs ~10 s of imports here.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraleak.locking import LOCK_FILE
import torch
import yaml

from loraleak.base.tiny import TinyBaseConfig, build_tiny_pipeline
from loraleak.config import from_dict, to_dict
from loraleak.defenses import DefenseConfig, defenses_applied
from loraleak.defenses.rank_truncation import truncate_lora
from loraleak.errors import ConfigError, LoraleakError
from loraleak.lora.io import lora_factors, read_lora
from loraleak.identities import SyntheticFaces
from loraleak.tracking import mlflow_run
from loraleak.zoo.build import FineTuneWorker, build_zoo, fine_tune_record, run_plan
from loraleak.zoo.cli import zoo_main
from loraleak.zoo.config import ZooConfig, read_zoo_config
from loraleak.zoo.inspect import verify_zoo, zoo_info
from loraleak.zoo.manifest import SCHEMA, finished_lora_ids, read_manifest, read_parts, to_table
from loraleak.zoo.plan import plan_zoo
from loraleak.zoo.reader import DELTA_PREFIX, delta_from_row, iter_zoo_samples, zoo_dataset
from loraleak.zoo.storage import ZooStore

REPO = Path(__file__).resolve().parents[1]
TINY = TinyBaseConfig(resolution=16, unet_channels=(32, 32), attention_levels=1, text_width=32,
                      text_layers=1, text_heads=1, vae_channels=(32,))
# Differ between two builds of the same zoo. The file hash too: diffusers writes peft's
# target_modules, a set, into the file's metadata in a per-process order; `same_loras` compares tensors.
RUN_COLUMNS = ("started_at", "wall_time_s", "worker", "lora_sha256")
LOSS_COLUMNS = ("final_loss", "loss_at_snapshot")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base")
    build_tiny_pipeline(TINY).save_pretrained(path, safe_serialization=True)
    return str(path)


def zoo_config(root, base, **overrides) -> ZooConfig:
    data = {
        "root": str(root), "base": base,
        "identities": {"kind": "synthetic", "num_identities": 3, "images_per_identity": 3},
        "finetune": {"rank": 2, "alpha": 2, "steps": 4, "prior_preservation": False},
        "num_snapshots": 2, "workers": 2, "tracking": False,
    }
    return from_dict(ZooConfig, {**data, **overrides})


@pytest.fixture(scope="module")
def reference(ray_local, tiny_base, tmp_path_factory):
    """An uninterrupted build, logged to a local MLflow store."""
    work = tmp_path_factory.mktemp("reference")
    # One worker: each actor costs ~8 s of imports on this 2-core machine (two workers: the slow test).
    cfg = zoo_config(work / "zoo", tiny_base, tracking=True, workdir=str(work / "mlflow"), workers=1)
    summary = build_zoo(cfg, show_progress=False)
    return cfg, summary


def comparable(table) -> list[dict]:
    return table.drop_columns(list(RUN_COLUMNS)).to_pylist()


def same_loras(root_a: str, root_b: str) -> bool:
    paths = read_manifest(root_a)["lora_path"].to_pylist()
    assert paths == read_manifest(root_b)["lora_path"].to_pylist()
    for path in paths:
        a, b = read_lora(Path(root_a) / path)[0], read_lora(Path(root_b) / path)[0]
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def copy_zoo(cfg: ZooConfig, dest: Path) -> ZooConfig:
    shutil.copytree(cfg.root, dest)
    return dataclasses.replace(cfg, root=str(dest), tracking=False, workers=0)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("vary, message", [
    ({"ranks": [4]}, "not a finetune setting"),
    ({"seed": [1, 2]}, "cannot vary"),
    ({"rank": []}, "at least one value"),
    ({"lr": ["fast"]}, "vary.lr[0]"),
])
def test_config_rejects_bad_variations(vary, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        from_dict(ZooConfig, {"root": "zoo", "vary": vary})


@pytest.mark.parametrize("settings, message", [
    ({"finetune": {"defense": {"kind": "dp_sgd", "epsilon": 10.0}}}, "set the zoo's `defense`"),
    ({"defense": {"kind": "dpgm", "epsilon": 10.0}, "vary": {"defense": [{"kind": "none"}]}}, "cannot vary"),
    ({"defense": {"kind": "rank_truncation"}}, "rank_truncation needs a rank"),
    ({"fine_tunes_per_pass": 0}, "fine_tunes_per_pass must be >= 1"),
    ({"batched_options": {"compile": True}}, "batched_options apply only with fine_tunes_per_pass > 1"),
    ({"fine_tunes_per_pass": 2, "batched_options": {"sdpa_typo": True}}, "batched_options: unknown key 'sdpa_typo'"),
    ({"fine_tunes_per_pass": 2, "finetune": {"mixed_precision": "bf16"},
      "batched_options": {"compile": True, "attention": "math"}},
     "batched_options: attention 'math' .* trains nothing"),
])
def test_config_rejects_bad_defenses_and_batching(settings, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ZooConfig, {"root": "zoo", **settings})


def test_variants_are_deterministic_and_give_distinct_ids(tiny_base, tmp_path):
    grid = zoo_config(tmp_path, tiny_base, vary={"rank": [2, 4], "steps": [4, 6]}, vary_mode="grid")
    plan = plan_zoo(grid, show_progress=False)
    assert len(plan.fine_tunes) == 3 * 4
    assert len({ft.lora_id for ft in plan.fine_tunes}) == 12
    first = [ft for ft in plan.fine_tunes if ft.identity_id == plan.fine_tunes[0].identity_id]
    assert sorted((ft.finetune.rank, ft.finetune.steps) for ft in first) == [(2, 4), (2, 6), (4, 4), (4, 6)]
    # Snapshots follow each fine-tune's own length, always with step 0.
    assert {ft.finetune.steps: ft.finetune.snapshot_steps for ft in first} == {4: (0, 2, 4), 6: (0, 3, 6)}

    drawn = zoo_config(tmp_path, tiny_base, vary={"lr": [1e-4, 2e-4, 3e-4]}, fine_tunes_per_identity=2)
    ids = [ft.lora_id for ft in plan_zoo(drawn, show_progress=False).fine_tunes]
    assert ids == [ft.lora_id for ft in plan_zoo(drawn, show_progress=False).fine_tunes]
    assert len(set(ids)) == 6
    # Every fine-tune draws its own seed, hence its own trigger word.
    assert len({ft.finetune.trigger_word for ft in plan.fine_tunes}) == 12

    # A subset of the identities keeps each one's split and id.
    some = plan_zoo(dataclasses.replace(grid, max_identities=2), show_progress=False).fine_tunes
    assert {(ft.identity_id, ft.split, ft.lora_id) for ft in some} < {(ft.identity_id, ft.split, ft.lora_id)
                                                                     for ft in plan.fine_tunes}
    assert len({ft.identity_id for ft in some}) == 2


# --- build, manifest, tracking ------------------------------------------------------------------

def test_build_writes_the_manifest_schema(reference):
    cfg, summary = reference
    assert (summary["planned"], summary["ran"], summary["done"], summary["failed"]) == (3, 3, 3, 0)
    assert summary["fine_tunes_per_minute"] > 0
    table = pq.read_table(Path(cfg.root) / "manifest.parquet")
    assert table.schema.equals(SCHEMA, check_metadata=True)
    rows = table.to_pylist()
    assert len(rows) == 3 * 3 and {r["status"] for r in rows} == {"done"}
    assert sorted({r["snapshot_step"] for r in rows}) == [0, 2, 4]
    assert {r["split"] for r in rows} == {"attack_train", "heldout"}
    for row in rows:
        assert (row["rank"], row["alpha"], row["targets"], row["steps"]) == (2, 2, ["to_q", "to_v"], 4)
        assert row["instance_prompt"] == f"A face of {row['trigger']}." and row["defense"] == "none"
        assert len(row["image_hashes"]) == row["num_images"] == 3
        assert (Path(cfg.root) / row["lora_path"]).stat().st_size == row["lora_bytes"]
    # Deterministic ids: planning the same config again names the same fine-tunes.
    assert {ft.lora_id for ft in plan_zoo(cfg, show_progress=False).fine_tunes} == {r["lora_id"] for r in rows}
    # The manifest is the union of the per-fine-tune parts.
    assert comparable(read_parts(ZooStore(cfg.root)).sort_by([("lora_id", "ascending"),
                                                              ("snapshot_step", "ascending")])) == comparable(table)


def test_manifest_rejects_unknown_columns():
    with pytest.raises(ValueError, match="unknown columns"):
        to_table([{"lora_id": "x", "rank_typo": 4}])


def test_parts_written_before_alpha_became_a_float_still_read(tmp_path):
    store = ZooStore(tmp_path)
    version_1 = SCHEMA.set(SCHEMA.get_field_index("alpha"), pa.field("alpha", pa.int32()))
    Path(store.parts_dir).mkdir()
    pq.write_table(pa.Table.from_pylist([{"lora_id": "old", "alpha": 27, "status": "done"}], schema=version_1),
                   store.part_path("old"))
    table = read_manifest(store)
    assert table.schema.field("alpha").type == pa.float64() and table["alpha"].to_pylist() == [27.0]


def test_build_is_an_mlflow_run(reference):
    from mlflow.tracking import MlflowClient

    cfg, _ = reference
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["finetune.rank"] == "2" and run.data.params["workers"] == "1"
    assert run.data.metrics["done"] == 3 and run.data.metrics["fine_tunes_per_minute"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"zoo_summary.json", "build_summary.json"}


def test_unreachable_tracking_server_is_one_line_error(tmp_path):
    started = time.perf_counter()
    with pytest.raises(LoraleakError, match="unreachable"):
        with mlflow_run("x", "y", tracking_uri="http://127.0.0.1:9", workdir=tmp_path):
            pass
    assert time.perf_counter() - started < 10


def test_class_images_are_sampled_once_with_their_own_bar_before_the_fine_tunes(tiny_base, tmp_path, capsys):
    """Prior preservation: the class images are sampled once per zoo, in the driver, under a "class images" bar
    with its ETA; the zoo's bar (and its rate and ETA) starts after them and counts fine-tune steps as they are
    done, not only fine-tunes as they end. A second build reads the class images back."""
    finetune = {"rank": 2, "alpha": 2, "steps": 2, "prior_preservation": True, "num_class_images": 3,
                "class_inference_steps": 2}
    cfg = zoo_config(tmp_path / "zoo", tiny_base, finetune=finetune, workers=0, num_snapshots=1)
    assert build_zoo(cfg, show_progress=True)["done"] == 3
    err = capsys.readouterr().err
    assert re.search(r"class images: 100%.*3/3 \[[\d:]+<[\d:]+", err), err  # images done / total, elapsed<ETA
    assert err.rindex("class images:") < err.index("zoo:")  # sampled, then the fine-tunes' bar starts
    # 3 fine-tunes x 2 steps: the first one's first step shows before any fine-tune has ended.
    assert re.search(r"zoo: +\d+%.* 1/6 \[.*fine-tunes 0 done, 0 failed, 3 left", err), err
    assert re.search(r"zoo: 100%.* 6/6 \[.*fine-tunes 3 done, 0 failed, 0 left", err), err
    # Into a log (not a terminal) every redraw is a line: the start, the first step, the end (and the close).
    assert err.count("zoo:") <= 4, err
    assert len(list((tmp_path / "zoo" / "class_images").iterdir())) == 1
    cached = {**finetune, "class_images_dir": str(tmp_path / "zoo" / "class_images")}
    assert build_zoo(zoo_config(tmp_path / "other", tiny_base, finetune=cached, workers=0, num_snapshots=1),
                     show_progress=True)["done"] == 3
    assert "class images:" not in capsys.readouterr().err  # the cache, read back


def test_a_remote_zoo_shares_its_class_images_through_the_root_so_no_worker_samples_them(tiny_base, tmp_path,
                                                                                          monkeypatch):
    """On remote storage each node has its own cache: the driver's sampled images travel through the root
    (ROOT/class_images/<name>/, manifest last), and a worker on another node downloads instead of sampling."""
    from loraleak.base.loading import base_fingerprint, load_base_pipeline
    from loraleak.finetune import class_images as cache_module
    from loraleak.finetune.config import FinetuneConfig
    from loraleak.zoo.class_images import class_images_cache, fetch_class_images, node_class_images, share_class_images

    store = ZooStore("mock:///zoo")  # pyarrow's in-memory filesystem: a root no node sees as a local folder
    assert not store.is_local
    pipe, base_hash = load_base_pipeline(tiny_base), base_fingerprint(tiny_base)
    ft = FinetuneConfig(prior_preservation=True, num_class_images=2, class_inference_steps=2)
    cfg = zoo_config(tmp_path / "unused", tiny_base)
    monkeypatch.setenv("HOME", str(tmp_path / "driver-home"))
    assert class_images_cache(cfg, store) == tmp_path / "driver-home" / ".cache" / "loraleak" / "class_images"
    sampled = node_class_images(cfg, store, pipe, base_hash, ft)  # the driver: nothing shared yet, so it samples
    [driver_dir] = class_images_cache(cfg, store).iterdir()
    share_class_images(store, driver_dir)
    shared = store.file_sizes(f"class_images/{driver_dir.name}")
    assert len(shared) == 3 and f"class_images/{driver_dir.name}/manifest.json" in shared

    def no_sampling(*args, **kwargs):
        raise AssertionError("a worker sampled class images the driver had shared")

    monkeypatch.setattr(cache_module, "generate_images", no_sampling)
    monkeypatch.setenv("HOME", str(tmp_path / "worker-home"))  # another node: an empty cache
    fetched = node_class_images(cfg, store, pipe, base_hash, ft)
    assert [im.tobytes() for im in fetched] == [im.tobytes() for im in sampled]
    assert not fetch_class_images(store, class_images_cache(cfg, store) / driver_dir.name)  # there already
    # A share cut off before its manifest is not fetched (the worker would sample instead of reading half).
    store.delete_file(store.abs(f"class_images/{driver_dir.name}/manifest.json"))
    assert not fetch_class_images(store, tmp_path / "third-node" / driver_dir.name)
    assert not (tmp_path / "third-node" / driver_dir.name).exists()


def test_steps_reported_by_ray_workers_reach_the_bar(ray_local):
    """On Ray the workers report their steps to a counter actor, which the driver's thread reads into the bar."""
    import ray

    from loraleak.zoo.progress import StepBar, StepCounter, polled, step_reporter

    counter = ray.remote(StepCounter).options(num_cpus=0).remote()
    bar = StepBar({"a": 4, "b": 4}, show=False)
    on_step = step_reporter(counter, ["a", "b"])  # one pass of two fine-tunes
    with polled(counter, bar):
        on_step(3)  # a pass's first report goes at once; later ones at most every REPORT_EVERY_S
        deadline = time.monotonic() + 120
        while bar.bar.n < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert bar.bar.n == 6
    bar.finished("a", "failed")  # an ended fine-tune counts all its steps
    assert bar.bar.n == 7 and bar.counts == {"done": 0, "failed": 1}
    ray.kill(counter)


def test_info_summarises(reference, capsys):
    cfg, _ = reference
    assert zoo_main(["info", cfg.root]) == 0
    assert "3 fine-tunes of 3 identities, 9 snapshot files" in capsys.readouterr().out
    info = zoo_info(cfg.root)
    assert (info["fine_tunes"], info["identities"], info["snapshot_files"]) == (3, 3, 9)
    assert info["status"] == {"done": 3} and info["rank"] == {"2": 3} and info["steps"] == {"4": 3}
    assert sum(info["split"].values()) == 3 and info["snapshots_per_fine_tune"] == {"3": 3}


# --- resume -------------------------------------------------------------------------------------

def test_rerun_redoes_only_missing_and_failed(reference, tmp_path):
    ref_cfg, _ = reference
    cfg = copy_zoo(ref_cfg, tmp_path / "zoo")
    store = ZooStore(cfg.root)
    parts = sorted(Path(store.parts_dir).glob("*.parquet"))
    deleted, failed, untouched = parts
    deleted.unlink()
    rows = pq.read_table(failed).to_pylist()[:1]
    rows[0].update(status="failed", error="RuntimeError: simulated", snapshot_step=None, lora_path=None)
    pq.write_table(to_table(rows), failed)
    before = untouched.read_bytes()
    # What a killed build leaves half-written: a staged fine-tune and a part being written.
    leftovers = [Path(cfg.root) / "loras" / ".stage-x-1-abcd", Path(store.parts_dir) / ".x.parquet.tmp-1-abcd"]
    leftovers[0].mkdir()
    leftovers[1].write_bytes(b"half a parquet file")

    assert finished_lora_ids(store) == {untouched.stem}
    summary = run_plan(cfg, plan_zoo(cfg, show_progress=False), show_progress=False)
    assert (summary["already_done"], summary["ran"], summary["done"], summary["failed"]) == (1, 2, 3, 0)
    assert untouched.read_bytes() == before  # the finished fine-tune was not run again
    assert not any(p.exists() for p in leftovers)
    # Same ids, same settings, same LoRAs as the uninterrupted build.
    assert comparable(read_manifest(store)) == comparable(read_manifest(ref_cfg.root))
    assert same_loras(cfg.root, ref_cfg.root)


# --- failed rows --------------------------------------------------------------------------------

def _photo_folder(root: Path) -> Path:
    faces = SyntheticFaces(2, 3, seed=7)
    for name, i in (("alice", 0), ("carol", 1)):
        (root / name).mkdir(parents=True)
        for j in range(3):
            faces.render(i, j, size=24).save(root / name / f"{j}.png")
    (root / "bob").mkdir()
    for j in range(3):  # every file of bob is garbage named like a photo
        (root / "bob" / f"{j}.jpg").write_bytes(b"not a jpeg at all")
    return root


def test_corrupt_images_skip_an_identity_or_fail_a_fine_tune(tiny_base, tmp_path):
    photos = _photo_folder(tmp_path / "photos")
    cfg = zoo_config(tmp_path / "zoo", tiny_base, workers=0,
                     identities={"kind": "folder", "root": str(photos), "min_images": 3})
    plan = plan_zoo(cfg, show_progress=False)
    # Unreadable at listing time: the identity is skipped, with its reason.
    assert [name for name, _ in plan.skipped_identities] == ["bob"]
    alice, carol = sorted(plan.fine_tunes, key=lambda ft: ft.identity_id)
    # Unreadable at fine-tune time: that fine-tune is a failed row, and the worker goes on.
    (photos / "carol" / "0.png").write_bytes(b"\x89PNG truncated")
    diverging = dataclasses.replace(alice, finetune=dataclasses.replace(alice.finetune, lr=1e30))
    worker = FineTuneWorker(cfg, plan.base_hash, own_process=False)
    results = [worker.fine_tune(fine_tune_record(ft)) for ft in (carol, diverging)]
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert "unreadable since the zoo was planned" in results[0]["error"]
    assert "diverged" in results[1]["error"]
    assert worker.fine_tune(fine_tune_record(alice))["status"] == "done"

    rows = {r["identity_id"]: r for r in read_parts(ZooStore(cfg.root)).to_pylist() if r["status"] == "failed"}
    assert list(rows) == ["carol"] and rows["carol"]["lora_path"] is None
    assert rows["carol"]["snapshot_step"] is None and rows["carol"]["trigger"] == carol.finetune.trigger_word
    assert finished_lora_ids(ZooStore(cfg.root)) == {alice.lora_id}


@pytest.mark.lfw
def test_zoo_of_real_faces(lfw_root, tiny_base, tmp_path):
    cfg = zoo_config(tmp_path / "zoo", tiny_base, workers=0, max_identities=2,
                     identities={"kind": "folder", "root": str(lfw_root / "private"), "crop_fraction": 0.48,
                                 "max_images": 5})
    summary = run_plan(cfg, plan_zoo(cfg, show_progress=False), show_progress=False)
    assert (summary["done"], summary["failed"]) == (2, 0)
    assert verify_zoo(cfg.root, show_progress=False).files_checked == 2 * 3
    assert all(r["num_images"] == 5 for r in read_manifest(cfg.root).to_pylist())


# --- verify -------------------------------------------------------------------------------------

def test_verify_catches_a_truncated_lora(reference, tmp_path, capsys):
    cfg = copy_zoo(reference[0], tmp_path / "zoo")
    assert verify_zoo(cfg.root, show_progress=False).files_checked == 9
    assert zoo_main(["verify", cfg.root]) == 0

    row = read_manifest(cfg.root).to_pylist()[4]
    path = Path(cfg.root) / row["lora_path"]
    path.write_bytes(path.read_bytes()[: row["lora_bytes"] // 2])
    report = verify_zoo(cfg.root, show_progress=False)
    assert not report.ok
    [problem] = report.problems
    assert (problem.lora_id, problem.snapshot_step) == (row["lora_id"], row["snapshot_step"])
    assert "truncated" in problem.message
    assert zoo_main(["verify", cfg.root]) == 2
    assert "1 problem(s)" in capsys.readouterr().err
    # A rerun would redo that fine-tune: a truncated file does not count as finished.
    assert row["lora_id"] not in finished_lora_ids(ZooStore(cfg.root))


def test_verify_checks_every_file_against_a_base(reference, tmp_path, capsys):
    """The same LoRA gate as every command, and the base's layer shapes: a LoRA of this zoo does not fit a
    32 px base with other widths."""
    other = tmp_path / "other-base"
    build_tiny_pipeline(TinyBaseConfig()).save_pretrained(other, safe_serialization=True)
    report = verify_zoo(reference[0].root, show_progress=False, base=str(other))
    assert len(report.problems) == report.files_checked == 9
    assert all("does not fit this base model" in p.message for p in report.problems)
    assert zoo_main(["verify", reference[0].root, "--base", str(other)]) == 2
    assert "9 problem(s)" in capsys.readouterr().err
    assert verify_zoo(reference[0].root, show_progress=False).ok  # the zoo's own base


# --- reader -------------------------------------------------------------------------------------

def test_reader_streams_deltas(reference):
    cfg, _ = reference
    samples = list(iter_zoo_samples(cfg.root))
    assert len(samples) == 3 * 2  # snapshots r = 2, 4 of each fine-tune (r = 0 is the reference)
    assert sorted({s.step for s in samples}) == [2, 4]
    heldout = list(iter_zoo_samples(cfg.root, split="heldout"))
    assert 0 < len(heldout) < len(samples) and {s.split for s in heldout} == {"heldout"}

    sample = samples[1]
    rows = {r["snapshot_step"]: r for r in read_manifest(cfg.root).to_pylist() if r["lora_id"] == sample.lora_id}
    theta_r, _ = read_lora(Path(cfg.root) / rows[sample.step]["lora_path"])
    theta_0, _ = read_lora(Path(cfg.root) / rows[0]["lora_path"])
    assert sample.delta.keys() == theta_r.keys()
    for key, delta in sample.delta.items():
        assert torch.equal(delta, theta_r[key] - theta_0[key])
    assert any(delta.abs().sum() > 0 for delta in sample.delta.values())
    assert sample.image_keys == rows[0]["image_keys"]

    dataset_rows = zoo_dataset(cfg.root, split="attack_train").take_all()
    assert len(dataset_rows) == len(samples) - len(heldout)
    row = dataset_rows[0]
    [match] = [s for s in samples if (s.lora_id, s.step) == (row["lora_id"], row["snapshot_step"])]
    delta = delta_from_row(row)
    assert delta.keys() == match.delta.keys()
    assert all(torch.equal(delta[k], match.delta[k]) for k in delta)
    assert sum(k.startswith(DELTA_PREFIX) for k in row) == len(match.delta)
    assert row["split"] == "attack_train" and list(row["image_keys"]) == match.image_keys


# --- K fine-tunes per UNet pass -----------------------------------------------------------------

def assert_same_updates(root: str, ref_root: str, rel: float = 1e-2) -> None:
    """Every snapshot file holds the reference's: θ_0 bit for bit, θ_r - θ_0 within float rounding
    (Adam amplifies rounding in near-zero gradients, as in test_batched_finetune)."""
    initial = {}
    for row in read_manifest(ref_root).to_pylist():  # by lora_id, then step: θ_0 first
        theta, ref = read_lora(Path(root) / row["lora_path"])[0], read_lora(Path(ref_root) / row["lora_path"])[0]
        assert theta.keys() == ref.keys()
        if row["snapshot_step"] == 0:
            assert all(torch.equal(theta[k], ref[k]) for k in ref)
            initial[row["lora_id"]] = ref
            continue
        for key, value in ref.items():
            update = value - initial[row["lora_id"]][key]
            assert update.norm() > 0 and (theta[key] - value).norm() <= rel * update.norm(), (row["lora_path"], key)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # in-process / a Ray actor
def test_fine_tunes_per_pass_builds_the_same_zoo(reference, tmp_path, workers):
    ref_cfg, _ = reference
    cfg = dataclasses.replace(ref_cfg, root=str(tmp_path / "zoo"), tracking=False, workers=workers,
                              fine_tunes_per_pass=2)
    summary = run_plan(cfg, plan_zoo(cfg, show_progress=False), show_progress=False)
    assert (summary["ran"], summary["done"], summary["failed"]) == (3, 3, 0)
    table, ref = read_manifest(cfg.root), read_manifest(ref_cfg.root)
    # Same ids, steps, status, files and settings; losses and tensors up to float rounding.
    assert table.drop_columns([*RUN_COLUMNS, *LOSS_COLUMNS]).to_pylist() == \
        ref.drop_columns([*RUN_COLUMNS, *LOSS_COLUMNS]).to_pylist()
    for column in LOSS_COLUMNS:
        assert table[column].to_pylist() == [v if v is None else pytest.approx(v, rel=1e-4)  # None at r = 0
                                             for v in ref[column].to_pylist()]
    assert_same_updates(cfg.root, ref_cfg.root)
    # K = 2 over 3 fine-tunes: two shared one UNet pass, the third ran alone on the single path.
    passes = [json.loads((Path(cfg.root) / "loras" / lora_id / "finetune.json").read_text())
              .get("batched", {"fine_tunes": 1})["fine_tunes"] for lora_id in set(table["lora_id"].to_pylist())]
    assert sorted(passes) == [1, 2, 2]


def test_a_fine_tune_that_fails_in_a_shared_pass_fails_alone(tiny_base, tmp_path):
    cfg = zoo_config(tmp_path / "zoo", tiny_base, workers=0, fine_tunes_per_pass=3)
    plan = plan_zoo(cfg, show_progress=False)
    first, *others = plan.fine_tunes
    diverging = dataclasses.replace(first, finetune=dataclasses.replace(first.finetune, lr=1e30))
    results = FineTuneWorker(cfg, plan.base_hash, own_process=False).fine_tune_together(
        [fine_tune_record(ft) for ft in (diverging, *others)])
    assert [r["status"] for r in results] == ["failed", "done", "done"]
    assert "diverged" in results[0]["error"]
    assert finished_lora_ids(ZooStore(cfg.root)) == {ft.lora_id for ft in others}
    for ft in others:  # trained together, and published
        assert json.loads((Path(cfg.root) / "loras" / ft.lora_id / "finetune.json").read_text())["batched"][
            "fine_tunes"] == 3


# --- the recorded config ------------------------------------------------------------------------

def test_a_zoo_records_its_config_and_holds_one_population(reference, tmp_path):
    ref_cfg, _ = reference
    assert read_zoo_config(ref_cfg.root) == ref_cfg
    cfg = copy_zoo(ref_cfg, tmp_path / "zoo")
    assert read_zoo_config(cfg.root) == dataclasses.replace(ref_cfg, root=cfg.root)  # read where it is now
    # Other settings give new fine-tunes of the same population; the root records the latest config.
    faster = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lr=2e-4))
    summary = run_plan(faster, plan_zoo(faster, show_progress=False), show_progress=False)
    assert (summary["already_done"], summary["done"], summary["zoo_fine_tunes"]) == (0, 3, 6)
    assert read_zoo_config(cfg.root) == faster
    # Another identity source: one line naming the difference, before anything is planned or written.
    other = dataclasses.replace(cfg, identities=dataclasses.replace(cfg.identities, seed=1))
    parts = sorted(Path(ZooStore(cfg.root).parts_dir).iterdir())
    with pytest.raises(ConfigError, match=r"identities\.seed: recorded 0, this config 1.*one population"):
        build_zoo(other, show_progress=False)
    assert sorted(Path(ZooStore(cfg.root).parts_dir).iterdir()) == parts
    assert read_zoo_config(cfg.root) == faster


def test_reading_the_config_of_a_root_without_one_is_one_line(tmp_path):
    with pytest.raises(LoraleakError, match="records no config"):
        read_zoo_config(str(tmp_path))


# --- defenses -----------------------------------------------------------------------------------

def test_rank_truncation_stores_the_truncated_loras(tiny_base, tmp_path):
    settings = {"workers": 0, "max_identities": 1,
                "finetune": {"rank": 2, "alpha": 3, "steps": 4, "prior_preservation": False}}
    plain = zoo_config(tmp_path / "plain", tiny_base, **settings)
    defended = zoo_config(tmp_path / "defended", tiny_base, defense={"kind": "rank_truncation", "rank": 1},
                          **settings)
    for cfg in (plain, defended):
        run_plan(cfg, plan_zoo(cfg, show_progress=False), show_progress=False)
    rows, plain_rows = read_manifest(defended.root).to_pylist(), read_manifest(plain.root).to_pylist()
    assert rows[0]["lora_id"] != plain_rows[0]["lora_id"]  # the defense is part of the id
    defense = DefenseConfig(kind="rank_truncation", rank=1)
    for row, plain_row in zip(rows, plain_rows, strict=True):
        # The file's rank and alpha (3 · 1/2: alpha / rank kept), as a loader applies them.
        assert (row["rank"], row["alpha"], row["defense"]) == (1, 1.5, defense.to_manifest())
        state, metadata = read_lora(Path(defended.root) / row["lora_path"])
        assert defenses_applied(metadata) == [defense]
        expected = truncate_lora(read_lora(Path(plain.root) / plain_row["lora_path"])[0], 1)
        assert state.keys() == expected.keys()
        assert all(torch.allclose(state[k], expected[k], atol=1e-7) for k in state), row["snapshot_step"]
    assert verify_zoo(defended.root, show_progress=False).ok  # files agree with the manifest's rank and alpha
    final = [s for s in iter_zoo_samples(defended.root) if s.step == 4]
    assert len(final) == 1 and all(1 in delta.shape for delta in final[0].delta.values())


def test_output_noise_gives_every_file_its_own_noise(reference, tmp_path):
    ref_cfg, _ = reference
    defense = DefenseConfig(kind="output_noise", relative_noise=0.5)
    cfg = dataclasses.replace(ref_cfg, root=str(tmp_path / "zoo"), tracking=False, workers=0, max_identities=2,
                              defense=defense)
    run_plan(cfg, plan_zoo(cfg, show_progress=False), show_progress=False)
    clean = {(r["identity_id"], r["snapshot_step"]): r["lora_path"] for r in read_manifest(ref_cfg.root).to_pylist()}
    rows = read_manifest(cfg.root).to_pylist()
    seeds = set()
    for row in rows:
        assert (row["rank"], row["alpha"], row["defense"]) == (2, 2.0, defense.to_manifest())
        noisy, metadata = read_lora(Path(cfg.root) / row["lora_path"])
        [applied] = defenses_applied(metadata)
        assert (applied.kind, applied.relative_noise) == ("output_noise", 0.5)
        seeds.add(applied.seed)
        original = lora_factors(read_lora(Path(ref_cfg.root) / clean[row["identity_id"], row["snapshot_step"]])[0])
        for module, (down, _) in lora_factors(noisy).items():  # the up factor is zero at step 0: no noise
            ratio = ((down - original[module][0]).norm() / original[module][0].norm()).item()
            assert 0.25 < ratio < 0.75, (row["lora_path"], module, ratio)
    assert len(rows) == 2 * 3 and len(seeds) == len(rows)  # no noise direction shared across the zoo


# --- a killed build -----------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_build_resumes_to_the_same_manifest(ray_local, tiny_base, tmp_path):
    """Kill `jobs/build_zoo.py` (driver, local Ray and workers) after its first parts, rerun it:
    the manifest equals an uninterrupted build's and no finished fine-tune ran again."""
    settings = {"identities": {"kind": "synthetic", "num_identities": 6, "images_per_identity": 3},
                "finetune": {"rank": 2, "alpha": 2, "steps": 60, "prior_preservation": False}, "workers": 1}
    cfg = zoo_config(tmp_path / "killed", tiny_base, **settings)
    config_file = tmp_path / "zoo.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    command = [sys.executable, str(REPO / "jobs" / "build_zoo.py"), str(config_file)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not this test's

    parts = Path(cfg.root) / "parts"
    job = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(parts.glob("*.parquet")) and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the whole session this test started: driver, Ray, workers
        job.wait()
    before = {p.name: p.read_bytes() for p in parts.glob("*.parquet")}
    assert 0 < len(before) < 6, "the build was not killed midway"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["already_done"] >= len(before) and summary["done"] == 6
    for name, data in before.items():  # finished fine-tunes were not run again
        assert (parts / name).read_bytes() == data
    # Nothing half-written is left (the folder's lock file stays: a lock is a file the kernel locks).
    assert not [p for p in Path(cfg.root).rglob(".*") if p.name != LOCK_FILE]

    uninterrupted = zoo_config(tmp_path / "uninterrupted", tiny_base, **{**settings, "workers": 2})
    build_zoo(uninterrupted, show_progress=False)
    assert comparable(read_manifest(cfg.root)) == comparable(read_manifest(uninterrupted.root))
    assert same_loras(cfg.root, uninterrupted.root)
