"""Identities: the synthetic face generator, folder sources, the identity split and the config."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraleak.config import from_dict
from loraleak.errors import ConfigError, InputError
from loraleak.identities import (
    FaceParams,
    FolderIdentities,
    IdentitiesConfig,
    SyntheticFaces,
    assign_splits,
    image_sha256,
    make_source,
    public_images,
    split_identities,
)
from loraleak.identities.synthetic import FACIAL_HAIR, GLASSES, HAIR_STYLES, HATS

LFW = Path(__file__).resolve().parents[1] / "../shared/datasets/lfw"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


# --- synthetic faces ---------------------------------------------------------------------------

def test_synthetic_is_deterministic_across_instances():
    a, b = SyntheticFaces(3, 4, seed=7), SyntheticFaces(3, 4, seed=7)
    assert a.params(2) == b.params(2)
    assert image_sha256(a.render(2, 3, 32)) == image_sha256(b.render(2, 3, 32))
    # The Identity loader renders exactly what render() does.
    loaded = a.identities()[1].load(32)
    assert [image_sha256(im) for im in loaded] == [image_sha256(b.render(1, j, 32)) for j in range(4)]


def test_identities_pickle_for_ray_workers(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "a.png").write_bytes(_photo(1))
    for source in (SyntheticFaces(2, 2, seed=4), FolderIdentities(tmp_path, min_images=1)):
        identity = source.identities()[0]
        copy = pickle.loads(pickle.dumps(identity))
        assert copy == identity
        assert [image_sha256(i) for i in copy.load(16)] == [image_sha256(i) for i in identity.load(16)]


def test_synthetic_ids_keys_and_load():
    source = SyntheticFaces(3, images_per_identity=4, seed=5, namespace="private")
    assert source.name == "synthetic"
    identities = source.identities()
    assert [i.identity_id for i in identities] == [f"syn-private-5-{i:05d}" for i in range(3)]
    assert identities[2].image_keys == tuple(f"syn-private-5-00002/{j}" for j in range(4))
    images = identities[0].load(32)
    assert len(images) == 4 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)


def test_identities_differ_in_several_attributes_and_pixels():
    source = SyntheticFaces(40, seed=0)
    params = [source.params(i) for i in range(40)]
    fields = [f.name for f in dataclasses.fields(FaceParams)]
    differing = [sum(getattr(p, f) != getattr(q, f) for f in fields) for p, q in zip(params, params[1:])]
    assert min(differing) >= 8  # continuous attributes alone make neighbours differ widely
    # Discrete, visible attributes differ between neighbours too, not only the continuous ones.
    discrete = ["skin", "hair_colour", "hair_style", "eye_colour", "lip_colour", "facial_hair", "glasses", "hat"]
    assert np.mean([sum(getattr(p, f) != getattr(q, f) for f in discrete)
                    for p, q in zip(params, params[1:])]) >= 4
    assert np.abs(pixels(source.render(0, 0)) - pixels(source.render(1, 0))).mean() > 10


def test_face_params_have_at_least_eight_varied_attributes():
    fields = [f.name for f in dataclasses.fields(FaceParams)]
    assert len(fields) >= 8
    params = [SyntheticFaces(60, seed=3).params(i) for i in range(60)]
    varied = [f for f in fields if len({getattr(p, f) for p in params}) > 1]
    assert len(varied) == len(fields), set(fields) - set(varied)
    # Every style of the categorical attributes actually occurs.
    assert len({p.hair_style for p in params}) >= 8
    assert {p.glasses for p in params} >= {"none", "round", "square", "sunglasses"}


def test_namespaces_and_seeds_are_disjoint():
    private, public = SyntheticFaces(20, namespace="private"), SyntheticFaces(20, namespace="public")
    other_seed = SyntheticFaces(20, seed=1, namespace="private")
    ids = [{i.identity_id for i in s.identities()} for s in (private, public, other_seed)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert all(private.params(i) != public.params(i) for i in range(20))
    assert all(private.params(i) != other_seed.params(i) for i in range(20))


def test_images_of_one_identity_vary_but_stay_recognisable():
    source = SyntheticFaces(30, 4, seed=1)
    a, b = pixels(source.render(0, 0)), pixels(source.render(0, 1))
    assert np.abs(a - b).mean() > 10  # real variation, not copies
    # A crude colour histogram of the face region identifies people far above chance (1/30):
    # identity survives pose, lighting, expression and background.
    features, labels = [], []
    for i in range(30):
        for j in range(4):
            centre = (np.asarray(source.render(i, j, 32))[8:24, 8:24] // 64).astype(int).reshape(-1, 3)
            hist = np.bincount(centre[:, 0] * 16 + centre[:, 1] * 4 + centre[:, 2], minlength=64)
            features.append(hist / hist.sum())
            labels.append(i)
    features, labels = np.array(features), np.array(labels)
    dist = np.abs(features[:, None] - features[None]).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert (labels[dist.argmin(1)] == labels).mean() > 0.4


@pytest.mark.parametrize("size", [17, 32, 96])
def test_any_size(size):
    image = SyntheticFaces(1).render(0, 0, size=size)
    assert image.size == (size, size) and image.mode == "RGB"
    assert pixels(image).std() > 5  # something was drawn


def test_public_images_are_many_public_identities():
    images = list(public_images(5, 24, seed=2))
    assert len(images) == 5 and all(im.size == (24, 24) for im in images)
    source = SyntheticFaces(3, 2, seed=2, namespace="public")
    assert [image_sha256(im) for im in images] == [
        image_sha256(source.render(k // 2, k % 2, 24)) for k in range(5)]


# The zoo, the attacks and every study's results are functions of these pixels: a change to the
# drawing code (or to Pillow / numpy's rasterising, resampling or random streams) that moves one
# pixel changes them all. Pinned from the drawing code as of issue 16 (before `_draw_face` was split).
DRAWN_FACES = (  # sha256 (first 16 hex digits) of images 0..2 of private identities 0..5, seed 0, 64 px
    ("d281165a65ade2de", "5edb8423629628a6", "43e69322479b855f"),
    ("ec8d3a7c9f01acd0", "1751e5c3cf47c453", "cfaa42c84ef802cb"),
    ("3856e4c14eb655cd", "80b097ac00224f60", "a26712163a4ae424"),
    ("bfab1e0ce5c25884", "7e6e76c8065894d4", "751c17819963111b"),
    ("598843cdd46101b4", "482e86d6183c59b9", "431ee87f291685bf"),
    ("5b2bb6045393ced6", "286f701a4c5e0a5c", "1a9162922d7934e4"),
)
# 80 public identities x 2 images at 32 px: every hair style, facial hair, glasses and hat is drawn.
DRAWN_FACES_ALL_STYLES = "cd66820420ac62da6cb1f0763eb097bdd5600cce8732753fa65fb152cd58e2be"


def test_drawn_faces_are_pinned():
    source = SyntheticFaces(6, 3, seed=0, namespace="private")
    assert tuple(tuple(image_sha256(im)[:16] for im in identity.load(64))
                 for identity in source.identities()) == DRAWN_FACES
    wide = SyntheticFaces(80, 2, seed=3, namespace="public")
    params = [wide.params(i) for i in range(80)]
    assert {p.hair_style for p in params} == set(HAIR_STYLES) and {p.hat for p in params} == set(HATS)
    assert {p.facial_hair for p in params} == set(FACIAL_HAIR) and {p.glasses for p in params} == set(GLASSES)
    combined = hashlib.sha256()
    for i in range(80):
        for j in range(2):
            combined.update(image_sha256(wide.render(i, j, 32)).encode())
    assert combined.hexdigest() == DRAWN_FACES_ALL_STYLES


# --- folder source -----------------------------------------------------------------------------

def _photo(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def photo_root(tmp_path: Path) -> Path:
    alice, bob, carol = (tmp_path / n for n in ("alice", "bob", "carol"))
    for folder in (alice, bob, carol):
        folder.mkdir()
    for k in range(5):
        (alice / f"a{k}.png").write_bytes(_photo(k))
        (carol / f"c{k}.JPG").write_bytes(_photo(10 + k, "JPEG"))
    (alice / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    real_jpg = _photo(99, "JPEG")
    (alice / "truncated.jpg").write_bytes(real_jpg[: len(real_jpg) // 2])
    (alice / "notes.txt").write_text("not an image")
    for k in range(2):
        (bob / f"b{k}.png").write_bytes(_photo(20 + k))
    (tmp_path / "stray.png").write_bytes(_photo(30))  # a file at the top level is not an identity
    return tmp_path


def test_folder_skips_unreadable_files_and_small_identities_with_reasons(photo_root, caplog):
    with caplog.at_level(logging.WARNING, logger="loraleak.identities.folder"):
        identities = FolderIdentities(photo_root, min_images=5).identities()
    assert [i.identity_id for i in identities] == ["alice", "carol"]
    assert identities[0].image_keys == tuple(f"alice/a{k}.png" for k in range(5))
    log = caplog.text
    assert "garbage.jpg" in log and "truncated.jpg" in log
    assert "skipping 1 of 3 identities" in log and "bob (2)" in log and "fewer than 5 readable" in log
    assert "notes.txt" not in log  # not an image extension: ignored, not an error
    images = identities[1].load(16)
    assert len(images) == 5 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)


def test_folder_max_images_min_images_and_crop(photo_root):
    source = FolderIdentities(photo_root, min_images=1, max_images=3, crop_fraction=0.5)
    identities = {i.identity_id: i for i in source.identities()}
    assert sorted(identities) == ["alice", "bob", "carol"]
    assert len(identities["alice"].image_keys) == 3 and len(identities["bob"].image_keys) == 2
    # crop_fraction keeps the centre: the 20x20 centre of a 40x60 photo, resized.
    original = Image.open(photo_root / "alice" / "a0.png").convert("RGB")
    expected = original.crop((20, 10, 40, 30)).resize((8, 8), Image.BICUBIC)
    assert image_sha256(identities["alice"].load(8)[0]) == image_sha256(expected)


def test_folder_missing_or_empty_root_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        FolderIdentities(tmp_path / "nope").identities()
    with pytest.raises(InputError, match="no identity subfolders"):
        FolderIdentities(tmp_path).identities()
    (tmp_path / "tiny").mkdir()
    with pytest.raises(InputError, match="at least 5 readable"):
        FolderIdentities(tmp_path).identities()


@pytest.mark.lfw
def test_folder_on_lfw():
    if not (LFW / "private").is_dir():
        pytest.skip(f"LFW not found at {LFW.resolve()} (../shared beside the repository)")
    identities = FolderIdentities(LFW / "private", min_images=5, max_images=5, crop_fraction=0.48).identities()
    assert len(identities) == 300
    images = identities[0].load(32)
    assert len(images) == 5 and images[0].size == (32, 32)


def test_train_min_images_adds_attack_train_identities_and_keeps_the_victims():
    if not (LFW / "private").is_dir():
        pytest.skip(f"LFW not found at {LFW.resolve()} (../shared beside the repository)")
    victims_only = IdentitiesConfig(kind="folder", root=LFW / "private", min_images=12, max_images=12,
                                    heldout_fraction=0.25)
    widened = dataclasses.replace(victims_only, train_min_images=5)
    before = assign_splits(victims_only, make_source(victims_only).identities())
    identities = make_source(widened).identities()
    after = assign_splits(widened, identities)
    assert len(before) == 90 and len(after) == 300
    # The held-out victims are the same people: the split among the 12+ photo identities is unchanged.
    assert {i: after[i] for i in before} == before
    assert sum(v == "heldout" for v in after.values()) == 22
    for identity in identities:
        if len(identity.image_keys) < 12:
            assert after[identity.identity_id] == "attack_train"


# --- split ---------------------------------------------------------------------------------------

def test_split_is_deterministic_order_independent_and_exact():
    ids = [f"person-{k}" for k in range(37)]
    split = split_identities(ids, 0.2, seed=3)
    assert split == split_identities(list(reversed(ids)), 0.2, seed=3)
    assert set(split) == set(ids)
    assert sum(v == "heldout" for v in split.values()) == round(37 * 0.2)
    assert split != split_identities(ids, 0.2, seed=4)
    for n, fraction in [(2, 0.2), (3, 0.9), (5, 0.5), (10, 0.2), (100, 0.25)]:
        values = list(split_identities([str(k) for k in range(n)], fraction).values())
        expected = min(max(round(n * fraction), 1), n - 1)
        assert values.count("heldout") == expected and values.count("attack_train") == n - expected
    assert split_identities(["only"], 0.2) == {"only": "attack_train"}


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="unique"):
        split_identities(["a", "b", "a"])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_identities(["a", "b"], 1.5)


# --- config --------------------------------------------------------------------------------------

def test_config_builds_sources():
    source = make_source(from_dict(IdentitiesConfig, {"num_identities": 4, "images_per_identity": 2}))
    assert isinstance(source, SyntheticFaces) and len(source.identities()) == 4
    folder = make_source(IdentitiesConfig(kind="folder", root=Path("/somewhere"), crop_fraction=0.48))
    assert isinstance(folder, FolderIdentities) and folder.crop_fraction == 0.48


@pytest.mark.parametrize("bad", [
    {"num_identities": 0}, {"images_per_identity": 0}, {"min_images": 0},
    {"min_images": 5, "max_images": 3}, {"crop_fraction": 0.0}, {"crop_fraction": 1.5},
    {"heldout_fraction": 0.0}, {"heldout_fraction": 1.0}, {"namespace": ""},
    {"train_min_images": 3},  # synthetic sources have no photos to count
    {"kind": "folder", "min_images": 5, "train_min_images": 6}, {"kind": "folder", "train_min_images": 0},
])
def test_config_range_checks(bad):
    with pytest.raises(ValueError):
        IdentitiesConfig(**bad)
    with pytest.raises(ConfigError):  # and one line at the edge
        from_dict(IdentitiesConfig, bad)


def test_config_errors_at_the_edge():
    with pytest.raises(ConfigError, match="unknown key 'num_ids'"):
        from_dict(IdentitiesConfig, {"num_ids": 3})
    with pytest.raises(ConfigError, match="kind"):
        from_dict(IdentitiesConfig, {"kind": "celeba"})
    with pytest.raises(ConfigError, match="root is required"):
        make_source(IdentitiesConfig(kind="folder"))
