"""The facenet scorer (the paper's metric) on random weights: the network, the file gate, the formula.

No pretrained VGGFace2 weights can be had offline, so these tests check everything but the weights'
values: the network's layout against facenet-pytorch 2.6.0's, loading a state dict from a file,
the embedding the scorer returns against the network's own output on a hand-built input, and the
similarity formula on hand-computed values.
"""

from __future__ import annotations

import hashlib
import re
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from loraleak.errors import InputError, LoraleakError
from loraleak.scoring.facenet_net import InceptionResnetV1
from loraleak.scoring.facenet_scorer import FacenetScorer, facenet_weights_path, load_facenet
from loraleak.scoring.registry import make_scorer

# sha256 of json.dumps([[key, shape], ...]) over facenet-pytorch 2.6.0's own
# InceptionResnetV1().state_dict() (its module file loaded without the package's torchvision-bound
# __init__): our copy must keep every name and shape, so that its published checkpoints load.
UPSTREAM_LAYOUT_SHA256 = "328848b7cecfc10c6723bc622ad7eee953f9ef941706f8e20b489eed452a9ea5"
UPSTREAM_PARAMETERS = 23_482_624


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def random_network(seed: int = 0) -> InceptionResnetV1:
    """Random weights and random BatchNorm statistics (so eval-mode BN is not the identity)."""
    torch.manual_seed(seed)
    net = InceptionResnetV1().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net = random_network()
    path = tmp_path_factory.mktemp("facenet") / "random-vggface2-layout.pt"
    state = dict(net.state_dict())
    # The VGGFace2 checkpoint carries its classifier over 8631 identities; the scorer drops it.
    state["logits.weight"] = torch.zeros(8631, 512)
    state["logits.bias"] = torch.zeros(8631)
    torch.save(state, path)
    return net, path


def test_network_layout_is_facenet_pytorchs():
    net = InceptionResnetV1()
    layout = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert hashlib.sha256(json.dumps(layout).encode()).hexdigest() == UPSTREAM_LAYOUT_SHA256
    assert sum(p.numel() for p in net.parameters()) == UPSTREAM_PARAMETERS


def faces(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)) for _ in range(n)]


def test_embedding_is_the_networks_own_output(saved):
    net, path = saved
    scorer = make_scorer("facenet", path)
    assert isinstance(scorer, FacenetScorer) and scorer.name == "facenet"
    images = faces()
    # Hand-built input: 160 px RGB, (pixel - 127.5) / 128, channels first (facenet-pytorch's).
    x = torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        expected = net((x - 127.5) / 128.0).numpy()
    got = np.stack(scorer.embed(images))
    assert got.shape == (3, 512)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Another random network gives other embeddings: the file's weights are what is used.
    assert np.abs(got - random_network(seed=1)((x - 127.5) / 128.0).detach().numpy()).max() > 1e-2


def test_safetensors_weights_load_the_same(saved, tmp_path):
    net, path = saved
    st = tmp_path / "facenet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(st))
    images = faces(2)
    np.testing.assert_array_equal(np.stack(make_scorer("facenet", st).embed(images)),
                                  np.stack(make_scorer("facenet", path).embed(images)))


def test_similarity_is_cos_plus_one_over_two(saved):
    scorer = FacenetScorer(random_network())
    a, b, c = np.array([1.0, 0.0]), np.array([0.6, 0.8]), np.array([-1.0, 0.0])
    assert scorer.similarity(a, b) == pytest.approx(0.8)      # cos 0.6
    assert scorer.similarity(a, a) == pytest.approx(1.0)
    assert scorer.similarity(a, c) == pytest.approx(0.0)
    assert scorer.similarity(a, np.array([0.0, 3.0])) == pytest.approx(0.5)  # orthogonal, any length
    assert scorer.distance(a, b) == pytest.approx(0.4)
    e = scorer.embed(faces(2))
    assert scorer.similarity(e[0], e[1]) == pytest.approx((float(np.dot(e[0], e[1])) + 1) / 2, abs=1e-6)


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "checkpoints" / "20180402-114759-vggface2.pt"
    assert facenet_weights_path() == expected
    with pytest.raises(LoraleakError, match="vggface2 weights at .*not found") as err:
        make_scorer("facenet")
    assert str(expected) in str(err.value)
    with pytest.raises(LoraleakError, match="not found"):
        make_scorer("facenet", tmp_path / "nope.pt")


def test_files_that_are_not_its_state_dict_are_one_line(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module: weights_only refuses it
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    wrong_shape = tmp_path / "wrong.pt"
    state = InceptionResnetV1().state_dict()
    state["last_linear.weight"] = torch.zeros(128, 1792)
    torch.save(state, wrong_shape)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    cases = {pickled: "not plain tensors", other: "keys missing, e.g. conv2d_1a.conv.weight; 2 unexpected",
             wrong_shape: r"last_linear.weight: \(128, 1792\), the network's is \(512, 1792\)",
             garbage: "unreadable safetensors", listed: "holds a list"}
    for path, reason in cases.items():
        with pytest.raises(InputError, match="not a state dict of facenet-pytorch's InceptionResnetV1") as err:
            load_facenet(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert re.search(reason, str(err.value)), str(err.value)
