"""A post-hoc-defended zoo derived from its undefended twin (zoo.derive): no fine-tune trained again, and
the zoo a training with the defense gives (the same files byte for byte, so the same lora_sha256 per
lora_id, and every manifest column but when and where the training ran); what the twin cannot give is
trained; a killed derivation resumes.

One random 16 px base and an undefended zoo of 2 synthetic identities x 4-step rank-2 fine-tunes (snapshots
at r = 0, 2, 4), every build in this process (`workers: 0`: a Ray actor costs ~10 s of imports here).
"""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from loraleak.base.tiny import build_tiny_pipeline
from loraleak.config import from_dict, to_dict
from loraleak.defenses import DefenseConfig, defenses_applied
from loraleak.locking import LOCK_FILE
from loraleak.lora.io import read_lora
from loraleak.zoo.build import build_zoo
from loraleak.zoo.cli import zoo_main
from loraleak.zoo.config import ZooConfig
from loraleak.zoo.defense import snapshot_defense
from loraleak.zoo.inspect import verify_zoo
from loraleak.zoo.manifest import read_manifest
from studies import TINY

DEFENSES = {"output_noise": DefenseConfig(kind="output_noise", relative_noise=0.5),
            "rank_truncation": DefenseConfig(kind="rank_truncation", rank=1)}
# Where and when the training that made the files ran: a derived fine-tune keeps its twin's.
RUN_COLUMNS = ("started_at", "wall_time_s", "worker")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> ZooConfig:
    work = tmp_path_factory.mktemp("derive")
    build_tiny_pipeline(TINY).save_pretrained(work / "base", safe_serialization=True)
    cfg = from_dict(ZooConfig, {
        "root": str(work / "plain"), "base": str(work / "base"),
        "identities": {"kind": "synthetic", "num_identities": 2, "images_per_identity": 2},
        "finetune": {"rank": 2, "alpha": 3, "steps": 4, "prior_preservation": False},
        "num_snapshots": 2, "workers": 0, "tracking": False})
    assert build_zoo(cfg, show_progress=False)["trained"] == 2
    return cfg


def defended(plain: ZooConfig, root: Path, kind: str) -> ZooConfig:
    return dataclasses.replace(plain, root=str(root), defense=DEFENSES[kind])


def comparable(root: str) -> list[dict]:
    return read_manifest(root).drop_columns(list(RUN_COLUMNS)).to_pylist()


def snapshot_files(root: str) -> dict[str, bytes]:
    return {path: (Path(root) / path).read_bytes() for path in read_manifest(root)["lora_path"].to_pylist()}


def leftovers(root: str) -> list[Path]:
    return [p for p in Path(root).rglob(".*") if p.name != LOCK_FILE]


@pytest.mark.parametrize("kind", sorted(DEFENSES))
def test_a_post_hoc_defended_zoo_is_derived_from_its_undefended_twin(plain, kind, tmp_path, caplog):
    before = snapshot_files(plain.root)
    cfg = defended(plain, tmp_path / "derived", kind)
    with caplog.at_level(logging.INFO, logger="loraleak.zoo"):
        summary = build_zoo(cfg, show_progress=False, undefended_twin=plain.root)
    assert (summary["derived"], summary["trained"], summary["done"], summary["failed"]) == (2, 0, 2, 0)
    assert f"derived from the undefended zoo {plain.root}: 2 fine-tune(s) copied and defended, 0 to train" \
        in caplog.text
    rows, twin_rows = read_manifest(cfg.root).to_pylist(), read_manifest(plain.root).to_pylist()
    assert len(rows) == len(twin_rows) == 2 * 3
    twin_by = {(r["identity_id"], r["snapshot_step"]): r for r in twin_rows}
    for row in rows:
        twin = twin_by[row["identity_id"], row["snapshot_step"]]
        assert row["lora_id"] != twin["lora_id"] and row["defense"] == DEFENSES[kind].to_manifest()
        assert row["lora_sha256"] != twin["lora_sha256"]  # the defended files, not copies of the twin's
        applied = snapshot_defense(DEFENSES[kind], row["lora_id"], row["snapshot_step"])  # its own noise seed
        assert defenses_applied(read_lora(Path(cfg.root) / row["lora_path"])[1]) == [applied]
        assert (row["started_at"], row["worker"]) == (twin["started_at"], twin["worker"])  # trained once, there
    assert verify_zoo(cfg.root, show_progress=False).ok  # files agree with the rows (rank, alpha, sha256)
    assert snapshot_files(plain.root) == before  # the twin only read
    assert not leftovers(cfg.root)


def test_a_derived_zoo_is_the_zoo_training_with_the_defense_gives(plain, tmp_path):
    """The project's claim that a zoo's lora_sha256 is reproducible, here across derivation and training."""
    for kind in sorted(DEFENSES):
        derived, trained = defended(plain, tmp_path / f"derived-{kind}", kind), defended(plain, tmp_path / kind, kind)
        assert build_zoo(derived, show_progress=False, undefended_twin=plain.root)["derived"] == 2
        assert build_zoo(trained, show_progress=False)["trained"] == 2
        assert comparable(derived.root) == comparable(trained.root), kind
        assert snapshot_files(derived.root) == snapshot_files(trained.root), kind


def test_what_the_twin_cannot_give_is_trained_and_a_killed_derivation_resumes(plain, tmp_path, caplog):
    # A twin whose file of one fine-tune was overwritten since its manifest was written (same size).
    twin = tmp_path / "twin"
    shutil.copytree(plain.root, twin)
    damaged = twin / read_manifest(str(twin)).to_pylist()[-1]["lora_path"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    cfg = defended(plain, tmp_path / "zoo", "output_noise")
    with caplog.at_level(logging.WARNING, logger="loraleak.zoo"):
        summary = build_zoo(cfg, show_progress=False, undefended_twin=str(twin))
    assert (summary["derived"], summary["trained"], summary["done"]) == (1, 1, 2)
    assert "differs from the twin's manifest" in caplog.text
    whole = comparable(cfg.root)

    # Killed while deriving: one fine-tune's part not yet written, its staging folder left behind.
    lora_id = whole[0]["lora_id"]
    (Path(cfg.root) / "parts" / f"{lora_id}.parquet").unlink()
    (Path(cfg.root) / "manifest.parquet").unlink()
    stage = Path(cfg.root) / "loras" / f".stage-{lora_id}-1-deadbeef"
    shutil.copytree(Path(cfg.root) / "loras" / lora_id, stage)
    resumed = build_zoo(cfg, show_progress=False, undefended_twin=plain.root)
    assert (resumed["already_done"], resumed["derived"], resumed["trained"]) == (1, 1, 0)
    assert comparable(cfg.root) == whole and not leftovers(cfg.root)
    assert verify_zoo(cfg.root, show_progress=False).ok


def test_zoo_build_derives_from_the_twin_it_is_given(plain, tmp_path, capsys):
    config = tmp_path / "zoo.yaml"
    config.write_text(yaml.safe_dump(to_dict(defended(plain, tmp_path / "zoo", "rank_truncation"))))
    assert zoo_main(["build", str(config), "--undefended-twin", plain.root]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert (summary["derived"], summary["trained"], summary["done"]) == (2, 0, 2)
