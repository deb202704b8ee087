"""tecoa and fare: their recipes are their sources' (every image, step schedules, FARE's step budget and attack
momentum), they train the image encoder only, FARE's loss is its source's, their checkpoints load as --checkpoint
and as --vision-weights, and NAP trains and evaluates on the robust encoder they make."""
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
    """On real data tecoa and fare train with their sources' budgets, as read in recipes.py's evidence: TeCoA
    (ZSRobust4FoundationModel @1243db66: README.md:66, finetuning.py) and FARE (RobustVLM @7de10ee: README.md:282,
    train/adversarial_training_clip.py, train/pgd_train.py); the toy trains them with their few-shot recipes."""
    t = train.parse_args(["--dataset", "caltech101", "--method", "tecoa"])
    assert (t.loss, t.eps, t.alpha, t.steps, t.start, t.attack_momentum) == ("adv", 1 / 255, 1 / 255, 2, "random", 0.0)
    assert (t.optimizer, t.lr, t.weight_decay, t.schedule, t.warmup_steps, t.epochs, t.max_steps) == \
        ("sgd", 1e-7, 0.0, "step", 1000, 10, 0)
    assert (t.shots, t.batch_size, t.augment, t.recipe) == (0, 256, "none", "tecoa")
    f = train.parse_args(["--dataset", "caltech101", "--method", "fare"])
    assert (f.loss, f.optimizer, f.lr, f.weight_decay, f.steps, f.clean_weight) == \
        ("fare", "adamw", 1e-5, 1e-4, 10, 0.0)
    assert (f.schedule, f.warmup_steps, f.max_steps, f.epochs, f.batch_size, f.shots) == \
        ("step", 1400, 20_000, 0, 128, 0)
    assert (f.eps, f.alpha, f.start, f.attack_momentum, f.augment) == (1 / 255, 1 / 255, "random", 0.9, "none")
    assert nap.PRESETS["tecoa"].template == "This is a photo of a {}"  # TeCoA's training prompt
    for method in ("tecoa", "fare"):  # the 16-shot fine-tune: one flag away, and the toy's
        few = train.parse_args(["--dataset", "caltech101", "--method", method, "--recipe", f"{method}-fewshot"])
        toy = train.parse_args(["--method", method])
        assert (few.shots, few.epochs, few.max_steps, few.batch_size, few.optimizer, few.lr, few.schedule) == \
            (16, 10, 0, 32, "adamw", 1e-5, "epoch")
        assert (toy.recipe, toy.shots, toy.epochs, toy.augment, toy.optimizer, toy.attack_momentum) == \
            (f"{method}-fewshot", 100, 30, "none", "adamw", 0.9 if method == "fare" else 0.0)
    by_epochs = train.parse_args(["--dataset", "caltech101", "--method", "fare", "--shots", "16", "--epochs", "10"])
    assert (by_epochs.epochs, by_epochs.max_steps, by_epochs.shots) == (10, 0, 16)  # --epochs alone trains by epochs


def test_the_step_schedule_is_the_sources_closed_form():
    """--schedule step: lr (s + 1) / W for the W warm-up steps, then 0.5 lr (1 + cos(pi (s - W) / (S - W))) down to
    0 at S, as cosine_lr in TeCoA's utils.py:35-49 and open_clip (FARE); the values below by hand."""
    f = train.parse_args(["--dataset", "caltech101", "--method", "fare"])  # lr 1e-5, W 1400, S 20,000
    lr = lambda s: train.learning_rate(f, 0, 1, s, 20_000)
    assert lr(0) == pytest.approx(1e-5 / 1400) and lr(699) == pytest.approx(0.5e-5) and lr(1399) == pytest.approx(1e-5)
    assert lr(1400) == pytest.approx(1e-5) and lr(1400 + 9300) == pytest.approx(0.5e-5)
    assert lr(1400 + 4650) == pytest.approx(0.5e-5 * (1 + 0.5 ** 0.5)) and lr(19_999) < 1e-12
    t = train.parse_args(["--dataset", "caltech101", "--method", "tecoa"])  # lr 1e-7, W 1000; S = 10 epochs of 5005
    total = train.run_length(t, 5005)[1]
    assert train.run_length(t, 5005) == (10, 50_050) and train.run_length(f, 10_009) == (2, 20_000)
    assert train.learning_rate(t, 0, 10, 0, total) == pytest.approx(1e-10)
    assert train.learning_rate(t, 5, 10, 1000 + 24_525, total) == pytest.approx(0.5e-7)


def test_shots_all_trains_on_every_image(tiny_weights, tmp_path, capsys, monkeypatch):
    """--shots all (or 0) takes every training image, as TeCoA and FARE do: 1000 synthetic images of 10 classes in 4
    batches of 250 an epoch; --shots 16 takes 160 (one batch)."""
    taken, step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: taken.append(1) or step(self, *a, **k))
    for shots, images, steps in (("all", 1000, 4), ("0", 1000, 4), ("16", 160, 1)):
        taken.clear()
        out = tmp_path / shots
        train.main([*FAST, "--arch", tiny_weights, "--method", "tecoa", "--shots", shots, "--batch-size", "250",
                    "--epochs", "1", "--steps", "0", "--out", str(out)])
        assert f"({images} images, 10 classes)" in capsys.readouterr().out and len(taken) == steps
        assert nap.load_checkpoint(str(out / "checkpoint.pt"))["args"]["shots"] == (16 if shots == "16" else 0)
    with pytest.raises(SystemExit):
        train.parse_args(["--shots", "some"])


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


def test_fares_attack_has_its_sign_momentum(tiny_weights, monkeypatch):
    """fare's training attack is RobustVLM's pgd_train.py: attacks.pgd with momentum 0.9; tecoa's is plain PGD (no
    momentum passed); --attack-momentum 0 turns it off."""
    seen, real = [], train.attacks.pgd
    monkeypatch.setattr(train.attacks, "pgd", lambda *a, **k: seen.append(k.get("momentum")) or real(*a, **k))
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    for method, flags, momentum in (("fare", [], 0.9), ("tecoa", [], None), ("fare", ["--attack-momentum", "0"], None)):
        model = nap.PromptedCLIP(CLIP(*TINY).eval(), ["cat", "dog"], nap.PRESETS[method])
        args = train.parse_args([*FAST, "--arch", tiny_weights, "--method", method, *flags])
        seen.clear()
        train.AdversarialStep(model, args)(x, y, torch.rand_like(x) * 2 - 1, torch.zeros(4, dtype=torch.bool), 0)
        assert seen == [momentum], (method, flags)


def test_fare_training_lowers_its_loss(tiny_weights, tmp_path):
    out = tmp_path / "fare"
    train.main([*FAST, "--arch", tiny_weights, "--method", "fare", "--epochs", "6", "--shots", "4",
                "--warmup-steps", "0", "--lr", "1e-4", "--out", str(out)])
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
