"""The stages' keys are the folder names of every study ever run: a refactor must not change them.

The values below were computed by the code on main before the stages became one type
(pipeline/run.py's own `_key` and `stage_keys`, commit e4335fc), for the packaged quick profile and
two variants that reach the other branches (a defended zoo with its undefended study; a pretrained
base). A change here renames every existing output folder: a rerun would redo every stage. Change
them only with a change of what a stage computes (then the new folder is right), never of its code's shape.
A legitimate edit of configs/pipeline-quick.yaml changes the first pin too: recompute it then.
"""

from __future__ import annotations

from loraleak.pipeline.cli import load_pipeline_config
from loraleak.pipeline.config import with_overrides
from loraleak.pipeline.stages import plan_stages, stage_keys

QUICK = {"base": "b5635b29", "pretrained_base": False, "zoo": "e583c7f2", "attack": "976b3740",
         "baselines": {"nearest_neighbour": "5b1be21f", "pca_map": "109eddc3"},
         "upstream": {"zoo": "e583c7f2", "attack": "976b3740", "attack_steps": 300,
                      "baselines": {"nearest_neighbour": "5b1be21f", "pca_map": "109eddc3"}},
         "evaluation": "c6b23704"}
QUICK_OUTPUT_NOISE = {
    "base": "b5635b29", "pretrained_base": False, "zoo": "1d5a5544", "attack": "efa05307",
    "baselines": {"nearest_neighbour": "128303dc", "pca_map": "91f34913"},
    "undefended_zoo": "e583c7f2", "undefended_attack": "976b3740",
    "upstream": {"zoo": "1d5a5544", "attack": "efa05307", "attack_steps": 300,
                 "baselines": {"nearest_neighbour": "128303dc", "pca_map": "91f34913"}, "undefended_attack": "976b3740"},
    "evaluation": "123395ca"}
QUICK_PRETRAINED = {"base": "b6257084", "pretrained_base": True, "zoo": "e6e60fe4", "attack": "819d8725",
                    "baselines": {"nearest_neighbour": "8118cd03", "pca_map": "f138d764"},
                    "upstream": {"zoo": "e6e60fe4", "attack": "819d8725", "attack_steps": 300,
                                 "baselines": {"nearest_neighbour": "8118cd03", "pca_map": "f138d764"}},
                    "evaluation": "7ca6b696"}


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
    assert stages.zoo.folder == tmp_path.resolve() / "zoo-e583c7f2"
    assert stages.attack.directory == tmp_path.resolve() / "attack-976b3740" / "attack"
    assert stages.folders() == {"zoo": "zoo-e583c7f2", "attack": "attack-976b3740",
                                "baselines": "baseline-nearest_neighbour-5b1be21f baseline-pca_map-109eddc3",
                                "evaluation": "evaluation-c6b23704"}
    assert not stages.attack.is_complete() and not stages.baselines.is_complete()
    defended = plan_stages(with_overrides(quick, {"zoo.defense": {"kind": "output_noise", "relative_noise": 0.5}}))
    assert [s.name for s in defended] == ["identities", "base", "zoo", "attack", "baselines", "zoo", "attack",
                                          "evaluation"]
    assert defended.undefended[0].folder == stages.zoo.folder  # the undefended study's own zoo, shared
