"""The evaluation's image cache on a real (tiny) zoo: evaluations that share the victims, the base and the
sampling settings read the images of every unchanged condition back instead of generating them, byte for byte
what a fresh generation gives; a damaged entry is generated again; another sampling setting is a miss."""

import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from loraleak.config import from_dict
from loraleak.evaluation.config import CONTROLS, EvaluationConfig
from loraleak.evaluation.evaluate import RESULTS_DIR, evaluate
from loraleak.evaluation.image_cache import ENTRY_FILE, ImageCache
from studies import build_evaluation_zoo, save_untrained_attack

NO_ATTACK = ["org", "base", *CONTROLS]  # the conditions a change of attack leaves as they were
VICTIMS = 3


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny base, a zoo of 6 fine-tunes (3 held-out victims) and two untrained network autoencoders that
    differ only in their random initial weights (two attacks, as a sweep over the attack makes)."""
    work = tmp_path_factory.mktemp("image_cache")
    zoo = build_evaluation_zoo(work)
    for seed in (1, 2):
        save_untrained_attack(zoo, work / f"nae{seed}", seed=seed)
    return work, zoo


def config(study, out, attack="nae1", cache="cache", **overrides) -> EvaluationConfig:
    work, zoo = study
    data = {"zoo": zoo.root, "attack": str(work / attack), "out_dir": str(out), "n_images": 2, "sample_steps": 2,
            "reference_size": 32, "n_boot": 50, "workers": 0, "tracking": False, "workdir": str(out),
            "image_cache": str(work / cache) if cache else None}
    return from_dict(EvaluationConfig, {**data, **overrides})


def records(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / RESULTS_DIR).glob("*.json"))}


def pngs(out, lora_id: str, condition: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / RESULTS_DIR / lora_id).glob(f"{condition}-*.png"))]


@pytest.fixture(scope="module")
def first(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    result = evaluate(config(study, out, cache="shared"), show_progress=False)
    return out, result


def test_an_evaluation_of_another_attack_generates_only_rec(study, first, tmp_path):
    out1, result1 = first
    summary1 = json.loads((out1 / "evaluation.json").read_text())
    assert summary1["image_sets"] == {"reused": 0, "generated": VICTIMS * 6}  # org, rec, base, 3 controls

    out2 = tmp_path / "second"
    result2 = evaluate(config(study, out2, attack="nae2", cache="shared"), show_progress=False)
    summary2 = json.loads((out2 / "evaluation.json").read_text())
    assert summary2["image_sets"] == {"reused": VICTIMS * len(NO_ATTACK), "generated": VICTIMS}
    first_records, second_records = records(out1), records(out2)
    assert list(first_records) == list(second_records) and len(first_records) == VICTIMS
    for lora_id, a in first_records.items():
        b = second_records[lora_id]
        for name in NO_ATTACK:  # the same images, hence exactly the same scores
            assert b["scores"][name] == a["scores"][name] and b["prompts"][name] == a["prompts"][name]
            assert pngs(out2, lora_id, name) == pngs(out1, lora_id, name)
        assert pngs(out2, lora_id, "rec") != pngs(out1, lora_id, "rec")  # another attack: its own images
    for name in NO_ATTACK:
        assert result2.metrics[name].similarity.value == result1.metrics[name].similarity.value

    # A hit is what a fresh generation gives, byte for byte: the same evaluation without the cache.
    out3 = tmp_path / "fresh"
    evaluate(config(study, out3, attack="nae2", cache=None), show_progress=False)
    for lora_id in first_records:
        for name in ["rec", *NO_ATTACK]:
            assert pngs(out3, lora_id, name) == pngs(out2, lora_id, name)
    assert json.loads((out3 / "evaluation.json").read_text())["image_sets"] == \
        {"reused": 0, "generated": VICTIMS * 6}


def test_the_cache_does_not_change_the_results_settings_key(study, first):
    """A folder evaluated without the cache is complete with it, and the other way round."""
    out1, _ = first
    again = evaluate(config(study, out1, cache=None), show_progress=False)
    assert again.reused == VICTIMS and again.evaluated == 0


def test_a_damaged_entry_is_generated_again_not_used(study, tmp_path, caplog):
    out1 = tmp_path / "one"
    evaluate(config(study, out1, cache="damaged", controls=[]), show_progress=False)
    cache = ImageCache(study[0] / "damaged")
    entries = sorted(p.parent for p in cache.root.glob(f"*/*/{ENTRY_FILE}"))
    assert len(entries) == VICTIMS * 3  # org, rec, base
    damaged = {entries[0]: sorted(entries[0].glob("*.png"))[0], entries[1]: entries[1] / ENTRY_FILE}
    kept = {path: path.read_bytes() for path in damaged.values()}
    damaged_png, damaged_entry = damaged.values()
    damaged_png.write_bytes(b"\x89PNG not an image")
    damaged_entry.write_text('{"key": ')  # a marker cut short

    out2 = tmp_path / "two"
    with caplog.at_level(logging.WARNING, logger="loraleak.evaluation.image_cache"):
        evaluate(config(study, out2, cache="damaged", controls=[]), show_progress=False)
    assert json.loads((out2 / "evaluation.json").read_text())["image_sets"] == \
        {"reused": VICTIMS * 3 - 2, "generated": 2}
    assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 2
    assert {path: path.read_bytes() for path in kept} == kept  # written again, as it was generated
    for lora_id, record in records(out1).items():
        assert records(out2)[lora_id]["scores"] == record["scores"]
        for name in ("org", "rec", "base"):
            assert pngs(out2, lora_id, name) == pngs(out1, lora_id, name)


@pytest.mark.parametrize("change", [{"guidance_scale": 2.0}, {"seed": 7}])
def test_another_sampling_setting_misses(study, first, tmp_path, change):
    out = tmp_path / "changed"
    evaluate(config(study, out, cache="shared", controls=[], **change), show_progress=False)
    assert json.loads((out / "evaluation.json").read_text())["image_sets"] == {"reused": 0, "generated": VICTIMS * 3}


def test_concurrent_writers_of_one_key_leave_one_entry(tmp_path):
    cache = ImageCache(tmp_path)
    cache.put("ab" * 16, [b"one", b"two"], "p", {})
    cache.put("ab" * 16, [b"one", b"two"], "p", {})  # a second writer that lost the race: its copy dropped
    assert cache.get("ab" * 16).images == [b"one", b"two"]
    assert [p.name for p in (tmp_path / "ab").iterdir()] == ["ab" * 16]  # no private folder left
    (cache.folder("ab" * 16) / "001.png").write_bytes(b"changed")
    assert cache.get("ab" * 16) is None
    cache.put("ab" * 16, [b"one", b"three"], "p", {})  # replaces the damaged entry
    assert cache.get("ab" * 16).images == [b"one", b"three"]


def test_the_pipeline_wires_the_cache_beside_its_stages(tmp_path):
    from loraleak.pipeline.config import PipelineConfig
    from loraleak.pipeline.stages import plan_stages

    cfg = from_dict(PipelineConfig, {"out_dir": str(tmp_path / "study")})
    assert plan_stages(cfg).evaluation.config.image_cache == (tmp_path / "study").resolve() / "image-cache"
    with pytest.raises(Exception, match="image_cache"):  # wired, not a setting of the study's evaluation
        from_dict(PipelineConfig, {"out_dir": str(tmp_path / "study"), "evaluation": {"image_cache": "x"}})


def test_a_bf16_evaluation_samples_its_own_images_within_rounding_of_fp32s(study, first, tmp_path):
    """Sampling under bf16 autocast (issue 22's faster evaluation) misses the fp32 entries and the fp32 results,
    and draws the same images up to rounding."""
    out1, _ = first
    out = tmp_path / "bf16"
    result = evaluate(config(study, out, cache="shared", controls=[], mixed_precision="bf16"), show_progress=False)
    assert json.loads((out / "evaluation.json").read_text())["image_sets"] == {"reused": 0, "generated": VICTIMS * 3}
    fp32_folder = tmp_path / "fp32-results"  # a copy: the module's other tests read `first`'s folder
    shutil.copytree(out1, fp32_folder)
    assert evaluate(config(study, fp32_folder, cache=None, mixed_precision="bf16"), show_progress=False).evaluated \
        == VICTIMS  # fp32 results are not results of a bf16 evaluation
    diffs = []
    for lora_id in records(out):
        for name in ("org", "rec", "base"):
            for a, b in zip(pngs(out, lora_id, name), pngs(out1, lora_id, name), strict=True):
                pixels = [np.asarray(Image.open(io.BytesIO(x)), dtype=np.float64) for x in (a, b)]
                diffs.append(np.abs(pixels[0] - pixels[1]).mean())
    assert max(diffs) > 0  # bf16 did run: not the fp32 bytes
    assert np.mean(diffs) < 2.0, diffs  # rounding, not other images (levels of 255; measured 0.5-0.6)
    again = evaluate(config(study, tmp_path / "bf16-again", cache="shared", controls=[], mixed_precision="bf16"),
                     show_progress=False)
    assert again.metrics["org"].similarity.value == result.metrics["org"].similarity.value
