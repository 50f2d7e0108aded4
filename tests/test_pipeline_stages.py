"""The stages' keys are the folder names of every study ever run: a refactor must not change them.

The values below were computed by the code on main before the stages became one type
(pipeline/run.py's own `_key` and `stage_keys`, commit e4335fc), for the packaged quick profile and
two variants that reach the other branches (a defended zoo with its undefended study; a pretrained
base). A change here renames every existing output folder: a rerun would redo every stage. Change
them only with a change of what a stage computes (then the new folder is right), never of its code's shape.
A legitimate edit of configs/pipeline-quick.yaml changes the first pin too: recompute it then.
Recomputed twice since: the quick profile's strong-victim settings and the fine-tune's wrong-trigger prior
(new FinetuneConfig fields: new fine-tunes, so new folders by design); the quick profile at batch 4 with
24 identities (2026-12-06). The pretrained base's key did not change when PretrainConfig gained fields
(pipeline.config.ADDED_SETTINGS are left out at their defaults).
Changed since, by design: the attack's
own key ("attack", "undefended_attack") includes max_steps, so that a longer attack gets its own folder
instead of overwriting the shorter one; the key before (its "line") is still the evaluation's upstream
"attack", so evaluation keys did not change, and a folder named by the line whose attack stopped at this
max_steps is still used (`test_an_attack_folder_named_before_max_steps_was_in_its_key_is_still_used`).
"""

from __future__ import annotations

from loraleak.pipeline.cli import load_pipeline_config
from loraleak.pipeline.config import with_overrides
from loraleak.pipeline.stages import plan_stages, stage_keys

QUICK = {'base': 'b5635b29', 'pretrained_base': False, 'zoo': '807839c1', 'attack': 'd3066ecd', 'baselines': {'nearest_neighbour': '5519f63f', 'pca_map': 'd95d16d5'}, 'upstream': {'zoo': '807839c1', 'attack': '779b9600', 'attack_steps': 300, 'baselines': {'nearest_neighbour': '5519f63f', 'pca_map': 'd95d16d5'}}, 'evaluation': '2da29d19'}
QUICK_OUTPUT_NOISE = {'base': 'b5635b29', 'pretrained_base': False, 'zoo': '76333d19', 'attack': '0acd274b', 'baselines': {'nearest_neighbour': 'db70b85b', 'pca_map': 'cf73764d'}, 'undefended_zoo': '807839c1', 'undefended_attack': 'd3066ecd', 'upstream': {'zoo': '76333d19', 'attack': '4838007d', 'attack_steps': 300, 'baselines': {'nearest_neighbour': 'db70b85b', 'pca_map': 'cf73764d'}, 'undefended_attack': '779b9600'}, 'evaluation': 'e46c319c'}
QUICK_PRETRAINED = {'base': 'b6257084', 'pretrained_base': True, 'zoo': '42aeb072', 'attack': 'f944c44d', 'baselines': {'nearest_neighbour': '15675e72', 'pca_map': '12004524'}, 'upstream': {'zoo': '42aeb072', 'attack': 'd2e99a4b', 'attack_steps': 300, 'baselines': {'nearest_neighbour': '15675e72', 'pca_map': '12004524'}}, 'evaluation': 'ef54391f'}

def test_the_quick_profiles_stage_keys_are_those_of_before_the_stage_type():
    quick = load_pipeline_config("quick")
    assert stage_keys(quick) == QUICK
    assert stage_keys(with_overrides(quick, {"zoo.defense": {"kind": "output_noise", "relative_noise": 0.5}})) \
        == QUICK_OUTPUT_NOISE
    assert stage_keys(with_overrides(quick, {"base.pretrain": {}})) == QUICK_PRETRAINED


def test_the_stages_place_their_folders_by_their_keys(tmp_path):
    quick = load_pipeline_config("quick", out=tmp_path)
    stages = plan_stages(quick)
    assert [s.name for s in stages] == ["identities", "base", "zoo", "attack", "baselines", "evaluation"]
    assert stages.base.folder is None and stages.base.ref == "tiny"  # the shipped base: nothing to build
    assert stages.zoo.folder == tmp_path.resolve() / "zoo-807839c1"
    assert stages.attack.directory == tmp_path.resolve() / "attack-d3066ecd" / "attack"
    assert stages.folders() == {"zoo": "zoo-807839c1", "attack": "attack-d3066ecd",
                                "baselines": "baseline-nearest_neighbour-5519f63f baseline-pca_map-d95d16d5",
                                "evaluation": "evaluation-2da29d19"}
    assert not stages.attack.is_complete() and not stages.baselines.is_complete()
    defended = plan_stages(with_overrides(quick, {"zoo.defense": {"kind": "output_noise", "relative_noise": 0.5}}))
    assert [s.name for s in defended] == ["identities", "base", "zoo", "attack", "baselines", "zoo", "attack",
                                          "evaluation"]
    assert defended.undefended[0].folder == stages.zoo.folder  # the undefended study's own zoo, shared
    # A post-hoc-defended zoo is derived from the zoo of the same settings without the defense (zoo.derive),
    # found by its key: also for a rank truncation, whose study has no undefended study of its own.
    truncated = plan_stages(with_overrides(quick, {"zoo.defense": {"kind": "rank_truncation", "rank": 1}}))
    assert defended.zoo.undefended_twin == truncated.zoo.undefended_twin == stages.zoo.folder
    assert truncated.undefended is None and stages.zoo.undefended_twin is None
    dp = plan_stages(with_overrides(quick, {"zoo.defense": {"kind": "dp_sgd", "epsilon": 10.0},
                                            "zoo.finetune.train_text_encoder": False}))
    assert dp.zoo.undefended_twin is None  # a training-time defense trains every fine-tune anew


def test_an_attack_folder_named_before_max_steps_was_in_its_key_is_still_used(tmp_path):
    """attack-<line> (the attack's key before max_steps was in it) is the folder of the attack that stopped there."""
    import json

    quick = load_pipeline_config("quick", out=tmp_path)
    legacy = tmp_path.resolve() / "attack-779b9600"
    (legacy / "attack").mkdir(parents=True)
    (legacy / "attack" / "training.json").write_text(json.dumps({"step": 300}))
    stages = plan_stages(quick)
    assert stages.attack.line == "779b9600" and stages.attack.folder == legacy and stages.attack.is_complete()
    assert stages.attack.config.run_name == "attack-779b9600"
    # Not for another max_steps: that one has its own folder (and continues from this one's checkpoint).
    longer = plan_stages(with_overrides(quick, {"attack.max_steps": 600}))
    assert longer.attack.line == "779b9600" and longer.attack.folder.name == f"attack-{longer.attack.key}"
    assert longer.attack.key != stages.attack.key and not longer.attack.is_complete()


def test_a_smaller_attack_training_set_is_another_attack_and_the_default_keeps_the_old_keys():
    quick = load_pipeline_config("quick")
    assert stage_keys(with_overrides(quick, {"attack.train_identities": None})) == QUICK  # pipeline.config.ADDED_SETTINGS
    fewer = stage_keys(with_overrides(quick, {"attack.train_identities": 8}))
    assert fewer["zoo"] == QUICK["zoo"] and fewer["baselines"] == QUICK["baselines"]  # the zoo is shared
    assert fewer["attack"] != QUICK["attack"] and fewer["evaluation"] != QUICK["evaluation"]


def test_one_folder_of_photos_is_one_key_however_the_command_spells_it(tmp_path, monkeypatch):
    # `loraleak run --profile lfw` from the repository root reads ../shared/...; a sweep's trials (Ray tasks,
    # another working directory) read the same folder from /. Both must find the same stage folders, so that
    # `loraleak sweep ... --stages runs/lfw` reuses the study's zoo instead of training a second one.
    photos = tmp_path / "shared" / "faces"
    photos.mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    quick = load_pipeline_config("quick", out=tmp_path / "out")
    spelled = [with_overrides(quick, {"identities.kind": "folder", "identities.root": root})
               for root in ("../shared/faces", str(photos), str(tmp_path / "repo" / ".." / "shared" / "faces"))]
    keys = [stage_keys(cfg) for cfg in spelled]
    assert keys[0] == keys[1] == keys[2]
    other = with_overrides(quick, {"identities.kind": "folder", "identities.root": str(tmp_path / "elsewhere")})
    assert stage_keys(other)["zoo"] != keys[0]["zoo"]  # another folder is another population
