"""The stages' keys are the folder names of every study ever run: a refactor must not change them.

The values below were computed by the code on main before the stages became one type
(pipeline/run.py's own `_key` and `stage_keys`, commit e4335fc), for the packaged quick profile and
two variants that reach the other branches (a defended zoo with its undefended study; a pretrained
base). A change here renames every existing output folder: a rerun would redo every stage. Change
them only with a change of what a stage computes (then the new folder is right), never of its code's shape.
A legitimate edit of configs/pipeline-quick.yaml changes the first pin too: recompute it then.
Recomputed once since: the quick profile's strong-victim settings and the fine-tune's wrong-trigger prior
(new FinetuneConfig fields: new fine-tunes, so new folders by design).
"""

from __future__ import annotations

from loraleak.pipeline.cli import load_pipeline_config
from loraleak.pipeline.config import with_overrides
from loraleak.pipeline.stages import plan_stages, stage_keys

QUICK = {'base': 'b5635b29', 'pretrained_base': False, 'zoo': 'ed6d9647', 'attack': '521b0fd1', 'baselines': {'nearest_neighbour': '7eee3259', 'pca_map': 'f85e1307'}, 'upstream': {'zoo': 'ed6d9647', 'attack': '521b0fd1', 'attack_steps': 300, 'baselines': {'nearest_neighbour': '7eee3259', 'pca_map': 'f85e1307'}}, 'evaluation': 'deb844d8'}
QUICK_OUTPUT_NOISE = {'base': 'b5635b29', 'pretrained_base': False, 'zoo': '11dba026', 'attack': 'a3119a96', 'baselines': {'nearest_neighbour': 'b9802442', 'pca_map': '92c53a25'}, 'undefended_zoo': 'ed6d9647', 'undefended_attack': '521b0fd1', 'upstream': {'zoo': '11dba026', 'attack': 'a3119a96', 'attack_steps': 300, 'baselines': {'nearest_neighbour': 'b9802442', 'pca_map': '92c53a25'}, 'undefended_attack': '521b0fd1'}, 'evaluation': '3b55d5e4'}
QUICK_PRETRAINED = {'base': 'b6257084', 'pretrained_base': True, 'zoo': 'c5d7f25b', 'attack': '19db629a', 'baselines': {'nearest_neighbour': '848efa37', 'pca_map': '8335642a'}, 'upstream': {'zoo': 'c5d7f25b', 'attack': '19db629a', 'attack_steps': 300, 'baselines': {'nearest_neighbour': '848efa37', 'pca_map': '8335642a'}}, 'evaluation': '76372d4a'}

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
    assert stages.zoo.folder == tmp_path.resolve() / "zoo-ed6d9647"
    assert stages.attack.directory == tmp_path.resolve() / "attack-521b0fd1" / "attack"
    assert stages.folders() == {"zoo": "zoo-ed6d9647", "attack": "attack-521b0fd1",
                                "baselines": "baseline-nearest_neighbour-7eee3259 baseline-pca_map-f85e1307",
                                "evaluation": "evaluation-deb844d8"}
    assert not stages.attack.is_complete() and not stages.baselines.is_complete()
    defended = plan_stages(with_overrides(quick, {"zoo.defense": {"kind": "output_noise", "relative_noise": 0.5}}))
    assert [s.name for s in defended] == ["identities", "base", "zoo", "attack", "baselines", "zoo", "attack",
                                          "evaluation"]
    assert defended.undefended[0].folder == stages.zoo.folder  # the undefended study's own zoo, shared
