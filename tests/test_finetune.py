"""tecoa and fare: they train the image encoder only, FARE's loss is its source's, their checkpoints load as
--checkpoint and as --vision-weights, and NAP trains and evaluates on the robust encoder they make."""
import json
import os

import pytest
import torch

import evaluate
import nap
import runtime
import train
from clip.model import CLIP
from conftest import TINY

FAST = ["--dataset", "synthetic", "--shots", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--epochs", "2", "--lr", "1e-3", "--steps", "2"]
EVAL = ["--dataset", "synthetic", "--attack", "pgd", "--steps", "2", "--n-samples", "16", "--batch-size", "8",
        "--workers", "0", "--device", "cpu"]




@pytest.fixture(scope="module")
def runs(tiny_weights, tmp_path_factory):
    """tecoa and fare trained for two epochs on the tiny CLIP: {method: checkpoint path}."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("tecoa", "fare"):
        train.main([*FAST, "--arch", tiny_weights, "--method", method, "--out", str(root / method)])
    return {m: str(root / m / "checkpoint.pt") for m in ("tecoa", "fare")}


def test_recipes_follow_their_sources():
    tecoa = train.parse_args(["--dataset", "caltech101", "--method", "tecoa"])
    assert (tecoa.loss, tecoa.eps, tecoa.alpha, tecoa.steps, tecoa.start) == ("adv", 1 / 255, 1 / 255, 2, "random")
    fare = train.parse_args(["--dataset", "caltech101", "--method", "fare"])
    assert (fare.loss, fare.optimizer, fare.lr, fare.weight_decay, fare.steps, fare.clean_weight) == \
        ("fare", "adamw", 1e-5, 1e-4, 10, 0.0)
    assert nap.PRESETS["tecoa"].template == "This is a photo of a {}"  # TeCoA's training prompt


def test_only_the_image_encoder_changes(runs, tiny_weights):
    original = torch.load(tiny_weights, weights_only=True)
    for method, path in runs.items():
        trained = nap.load_checkpoint(path)["trainable"]
        assert set(trained) == {"clip." + k for k in original if k.startswith("visual.")}, method
        assert any(not torch.equal(v, original[k[len("clip."):]]) for k, v in trained.items()), method
    model = runtime.load_backbone(tiny_weights, torch.device("cpu"))
    nap.from_checkpoint(model, nap.load_checkpoint(runs["tecoa"]))
    for k, v in model.state_dict().items():  # the text tower is the original's, bit for bit
        if not k.startswith("visual."):
            assert torch.equal(v, original[k]), k


def test_fare_loss_is_zero_at_the_clean_point_of_the_original_encoder(tiny_weights):
    torch.manual_seed(0)
    model = nap.PromptedCLIP(CLIP(*TINY).eval(), ["cat", "dog"], nap.PRESETS["fare"])
    args = train.parse_args([*FAST, "--arch", tiny_weights, "--method", "fare", "--steps", "0"])
    step = train.AdversarialStep(model, args)
    x = torch.rand(4, 3, 32, 32)
    loss, _, _ = step(x, torch.tensor([0, 1, 0, 1]), torch.zeros_like(x), torch.zeros(4, dtype=torch.bool), 0)
    assert loss.item() == 0.0  # f(x) = f0(x) before training, with no attack
    args = train.parse_args([*FAST, "--arch", tiny_weights, "--method", "fare"])
    attacked, _, _ = train.AdversarialStep(model, args)(x, torch.tensor([0, 1, 0, 1]), torch.rand_like(x) * 2 - 1,
                                                       torch.zeros(4, dtype=torch.bool), 0)
    assert attacked.item() > 0  # the attack moves the embedding away from f0(x)


def test_fare_training_lowers_its_loss(tiny_weights, tmp_path):
    out = tmp_path / "fare"
    train.main([*FAST, "--arch", tiny_weights, "--method", "fare", "--epochs", "6", "--shots", "4",
                "--warmup-epochs", "0", "--lr", "1e-4", "--out", str(out)])
    losses = [h["loss"] for h in nap.load_checkpoint(str(out / "checkpoint.pt"))["history"]]
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_fine_tuned_encoder_loads_three_ways_with_one_table(runs, tiny_weights, tmp_path):
    """--checkpoint, --vision-weights on the original backbone, and a merged full CLIP file: the same numbers."""
    merged = torch.load(tiny_weights, weights_only=True)
    merged.update({k[len("clip."):]: v for k, v in nap.load_checkpoint(runs["tecoa"])["trainable"].items()})
    torch.save(merged, tmp_path / "merged.pt")
    tables = []
    for flags in (["--checkpoint", runs["tecoa"]], ["--arch", tiny_weights, "--vision-weights", runs["tecoa"]],
                  ["--arch", str(tmp_path / "merged.pt")]):
        out = str(tmp_path / f"{len(tables)}.json")
        evaluate.main([*flags, *EVAL, "--out", out])
        row = json.load(open(out))["synthetic"]
        tables.append((row["clean"], row["robust"]))
    assert tables[0] == tables[1] == tables[2]
    unchanged = str(tmp_path / "zs.json")
    evaluate.main(["--arch", tiny_weights, *EVAL, "--out", unchanged])
    assert json.load(open(unchanged))["synthetic"]["contents"]["backbone"]["vision_sha256"] is None


def test_nap_on_a_robust_encoder(runs, tiny_weights, tmp_path):
    out = tmp_path / "nap"
    train.main([*FAST, "--arch", tiny_weights, "--vision-weights", runs["tecoa"], "--method", "nap", "--depth", "2",
                "--out", str(out)])
    ckpt = nap.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["backbone"]["vision_sha256"] == runtime.sha256_file(runs["tecoa"])
    evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), *EVAL, "--out", str(tmp_path / "e.json")])
    row = json.load(open(tmp_path / "e.json"))["synthetic"]
    assert row["contents"]["backbone"]["vision_sha256"] == ckpt["backbone"]["vision_sha256"]
    with pytest.raises(ValueError, match="--vision-weights.*SHA256"):  # another encoder under the checkpoint
        evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--vision-weights", runs["fare"], *EVAL,
                       "--out", str(tmp_path / "f.json")])
    moved = str(tmp_path / "tecoa.pt")
    os.rename(runs["tecoa"], moved)
    try:
        with pytest.raises(FileNotFoundError, match="gone.*--vision-weights"):
            evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), *EVAL, "--out", str(tmp_path / "g.json")])
        evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--vision-weights", moved, *EVAL,
                       "--out", str(tmp_path / "g.json")])
        assert json.load(open(tmp_path / "g.json"))["synthetic"]["clean"] == row["clean"]
    finally:
        os.rename(moved, runs["tecoa"])


def test_fine_tuning_trains_float32_weights_under_fp16(tiny_weights, tmp_path):
    """fp16 backbones (the GPU default) still train the encoder in float32, so the gradient scaler can unscale."""
    args = train.parse_args([*FAST, "--arch", tiny_weights, "--method", "tecoa"])
    backbone = runtime.load_backbone(tiny_weights, torch.device("cpu"), "fp16")
    model = train.build_model(args, backbone, ["cat", "dog"])
    assert {p.dtype for p in model.clip.visual.parameters()} == {torch.float32}
    assert model.clip.text_projection.dtype == torch.float16  # the frozen text tower keeps its precision
