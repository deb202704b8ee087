import dataclasses
import math
import os

import pytest
import torch

import clip
import toyclip
from toyclip import ToyConfig

# a reduced toy: one block per tower (two heads each: narrower towers take far longer to start
# learning), 64 px with 16 px patches, 150 steps of batch 32
TINY = ToyConfig(vision_layers=1, text_layers=1, steps=150, batch_size=32, lr=1e-3, warmup=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds the reduced toy once into a fresh cache folder -> (folder, model, preprocess, losses)."""
    root = str(tmp_path_factory.mktemp("clip_cache"))
    losses = []

    def pretrain_and_record(cfg, progress=True):
        model, step_losses = pretrain(cfg, progress)
        losses.extend(step_losses)
        return model, step_losses

    pretrain = toyclip.pretrain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(toyclip, "pretrain", pretrain_and_record)
        model, preprocess = toyclip.load(download_root=root, config=TINY)
    return root, model, preprocess, losses


def test_name_hashes_the_whole_config():
    assert ToyConfig().name() == ToyConfig().name()
    assert ToyConfig().name().startswith("toy-") and ToyConfig().name().endswith(".pt")
    assert ToyConfig(seed=1).name() != ToyConfig().name()
    assert ToyConfig(steps=1).name() != ToyConfig().name()


def test_default_config_is_a_loadable_clip_shape():
    cfg = ToyConfig()
    assert cfg.vision_width % 64 == 0 and cfg.text_width % 64 == 0
    assert cfg.image_resolution % cfg.vision_patch_size == 0


def test_window_encoding_equals_full_context():
    torch.manual_seed(0)
    model = toyclip.build_untrained(TINY).eval()
    full = clip.tokenize(["a photo of a red circle.", "a small thing"])
    with torch.no_grad():
        expected = model.encode_text(full)
        got = toyclip.encode_text_window(model, full[:, :12])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_build_caches_one_file_and_reloads_it_bitwise(built, monkeypatch):
    root, model, preprocess, _ = built
    assert os.listdir(root) == [TINY.name()]          # atomic write: no temporary file left
    assert model.visual.input_resolution == 64 and not model.training
    saved = torch.load(os.path.join(root, TINY.name()), weights_only=True)
    assert saved.keys() == model.state_dict().keys()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached toy CLIP must be loaded, not trained again")

    monkeypatch.setattr(toyclip, "pretrain", no_training)
    again, _ = toyclip.load(download_root=root, config=TINY)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
        assert torch.equal(value, saved[key]), key
    # the same file through the ordinary CLIP loader, found via $CLIP_CACHE
    monkeypatch.setenv("CLIP_CACHE", root)
    via_env, _ = toyclip.load(config=TINY)
    via_clip, _ = clip.load(os.path.join(root, TINY.name()), device="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, via_env.state_dict()[key]) and torch.equal(value, via_clip.state_dict()[key])


def test_pretraining_learns(built):
    *_, losses = built
    chance = math.log(TINY.batch_size)   # the loss of features that ignore their input
    assert len(losses) == TINY.steps
    assert losses[0] > chance and sum(losses[-10:]) / 10 < chance - 0.25, losses


def test_pretraining_is_reproducible():
    cfg = dataclasses.replace(TINY, steps=3)
    (a, losses_a), (b, losses_b) = toyclip.pretrain(cfg, False), toyclip.pretrain(cfg, False)
    assert losses_a == losses_b
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_zeroshot_accuracy_beats_chance_on_colour(built):
    _, model, preprocess, _ = built
    acc = toyclip.zeroshot_accuracy(model, preprocess, "synthetic-colour", size=160)
    assert 2 / 8 < acc <= 1.0
