"""The stages' keys are the folder names of every study ever run: a refactor must not change them.

The values below were computed by the code on main before the stages became one type
(pipeline/run.py's own `_key` and `stage_keys`, commit e4335fc), for the packaged quick profile and
two variants that reach the other branches (a defended zoo with its undefended study; a pretrained
base). A change here renames every existing output folder: a rerun would redo every stage. Change
them only with a change of what a stage computes (then the new folder is right), never of its code's shape.
A legitimate edit of configs/pipeline-quick.yaml changes the first pin too: recompute it then.
Recomputed once since: the quick profile's strong-victim settings and the fine-tune's wrong-trigger prior
(new FinetuneConfig fields: new fine-tunes, so new folders by design). Changed since, by design: the attack's
own key ("attack", "undefended_attack") includes max_steps, so that a longer attack gets its own folder
instead of overwriting the shorter one; the key before (its "line") is still the evaluation's upstream
"attack", so evaluation keys did not change, and a folder named by the line whose attack stopped at this
max_steps is still used (`test_an_attack_folder_named_before_max_steps_was_in_its_key_is_still_used`).
"""

from __future__ import annotations

from loraleak.pipeline.cli import load_pipeline_config
from loraleak.pipeline.config import with_overrides
from loraleak.pipeline.stages import plan_stages, stage_keys

QUICK = {'base': 'b5635b29', 'pretrained_base': False, 'zoo': 'd671b34f', 'attack': '97b25993', 'baselines': {'nearest_neighbour': '10d8f4af', 'pca_map': '6ce20097'}, 'upstream': {'zoo': 'd671b34f', 'attack': '66d90bd2', 'attack_steps': 300, 'baselines': {'nearest_neighbour': '10d8f4af', 'pca_map': '6ce20097'}}, 'evaluation': '61cbf323'}
QUICK_OUTPUT_NOISE = {'base': 'b5635b29', 'pretrained_base': False, 'zoo': 'ccbea74c', 'attack': 'e7b5ecf5', 'baselines': {'nearest_neighbour': '8e5c24e2', 'pca_map': 'c5cc17f1'}, 'undefended_zoo': 'd671b34f', 'undefended_attack': '97b25993', 'upstream': {'zoo': 'ccbea74c', 'attack': 'd9b76341', 'attack_steps': 300, 'baselines': {'nearest_neighbour': '8e5c24e2', 'pca_map': 'c5cc17f1'}, 'undefended_attack': '66d90bd2'}, 'evaluation': '4b5726a3'}
QUICK_PRETRAINED = {'base': 'b6257084', 'pretrained_base': True, 'zoo': '8eae349b', 'attack': 'd0ce0e74', 'baselines': {'nearest_neighbour': 'b2d75d64', 'pca_map': 'cc6e3bf4'}, 'upstream': {'zoo': '8eae349b', 'attack': 'cb98e553', 'attack_steps': 300, 'baselines': {'nearest_neighbour': 'b2d75d64', 'pca_map': 'cc6e3bf4'}}, 'evaluation': 'bc8ea400'}

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
    assert stages.zoo.folder == tmp_path.resolve() / "zoo-d671b34f"
    assert stages.attack.directory == tmp_path.resolve() / "attack-97b25993" / "attack"
    assert stages.folders() == {"zoo": "zoo-d671b34f", "attack": "attack-97b25993",
                                "baselines": "baseline-nearest_neighbour-10d8f4af baseline-pca_map-6ce20097",
                                "evaluation": "evaluation-61cbf323"}
    assert not stages.attack.is_complete() and not stages.baselines.is_complete()
    defended = plan_stages(with_overrides(quick, {"zoo.defense": {"kind": "output_noise", "relative_noise": 0.5}}))
    assert [s.name for s in defended] == ["identities", "base", "zoo", "attack", "baselines", "zoo", "attack",
                                          "evaluation"]
    assert defended.undefended[0].folder == stages.zoo.folder  # the undefended study's own zoo, shared


def test_an_attack_folder_named_before_max_steps_was_in_its_key_is_still_used(tmp_path):
    """attack-<line> (the attack's key before max_steps was in it) is the folder of the attack that stopped there."""
    import json

    quick = load_pipeline_config("quick", out=tmp_path)
    legacy = tmp_path.resolve() / "attack-66d90bd2"
    (legacy / "attack").mkdir(parents=True)
    (legacy / "attack" / "training.json").write_text(json.dumps({"step": 300}))
    stages = plan_stages(quick)
    assert stages.attack.line == "66d90bd2" and stages.attack.folder == legacy and stages.attack.is_complete()
    assert stages.attack.config.run_name == "attack-66d90bd2"
    # Not for another max_steps: that one has its own folder (and continues from this one's checkpoint).
    longer = plan_stages(with_overrides(quick, {"attack.max_steps": 600}))
    assert longer.attack.line == "66d90bd2" and longer.attack.folder.name == f"attack-{longer.attack.key}"
    assert longer.attack.key != stages.attack.key and not longer.attack.is_complete()
