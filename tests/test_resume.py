"""--resume continues the run that was started: every trainable method, interrupted after its first epoch
and resumed, ends bit for bit where the uninterrupted run ends (FARE's target encoder included); a resume
on changed training data is refused in one line, and a full disk says to resume; the schedules are their
sources' closed forms, also across a resume of a --max-steps run."""
import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import nap
import recipes
import runtime
import train
from conftest import stop_after_first_checkpoint

FAST = ["--dataset", "synthetic", "--shots", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--depth", "2", "--steps", "1", "--epochs", "2", "--lr", "1e-3", "--warmup-epochs", "0"]
METHODS = ("advpt", "advvpt", "advvlp", "advmaple", "nap", "tecoa", "fare")


def images(folder, n=4, seed=0):
    """n random 32-px PNG images in folder -> folder (a str)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def swap(a, b):
    """Swaps the names of two folders."""
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)


def final(out) -> tuple:
    """(trainable tensors, history, optimiser state) of the run in `out`."""
    ckpt = nap.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    return ckpt["trainable"], ckpt["history"], ckpt["optimizer"]["state"]


def same_run(a, b):
    """The two runs' trainable tensors, histories and optimiser states are equal, exactly."""
    (ta, ha, sa), (tb, hb, sb) = a, b
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert set(ta) == set(tb) and not differ, differ
    assert ha == hb
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("method", METHODS)
def test_an_interrupted_run_resumes_exactly(method, tiny_weights, tmp_path, monkeypatch):
    """Interrupted after epoch 1 (as by Ctrl-C) and resumed: the same tensors and history as without the break.

    Exact, not to a tolerance: the resumed process rebuilds the same model, loads the saved tensors,
    optimiser and RNG state, and replays the same per-image crops, PGD starts and batches in the same
    order on one thread. For fare this needs f0, the target encoder, to be the backbone as loaded: a
    target copied after the resumed state was loaded is the half-trained encoder."""
    flags = [*FAST, "--arch", tiny_weights, "--method", method]
    train.main([*flags, "--out", str(tmp_path / "whole")])
    stop_after_first_checkpoint(monkeypatch, [*flags, "--out", str(tmp_path / "split")])
    assert nap.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))["epoch"] == 0
    train.main([*flags, "--out", str(tmp_path / "split"), "--resume"])
    same_run(final(tmp_path / "whole"), final(tmp_path / "split"))


def test_fare_resumes_exactly_within_its_step_budget(tiny_weights, tmp_path, monkeypatch):
    """fare's own kind of schedule (--max-steps, a linear warm-up, cosine per step): 5 steps of 2 an epoch, so the
    third epoch, after the resume, is cut to 1 step; every step's lr is the closed form, across the resume too."""
    flags = [*FAST[:-6], "--arch", tiny_weights, "--method", "fare", "--max-steps", "5", "--warmup-steps", "2",
             "--lr", "1e-3"]
    applied, step = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        applied.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    train.main([*flags, "--out", str(tmp_path / "whole")])
    whole_lrs, applied[:] = list(applied), []
    stop_after_first_checkpoint(monkeypatch, [*flags, "--out", str(tmp_path / "split")])
    train.main([*flags, "--out", str(tmp_path / "split"), "--resume"])
    whole = final(tmp_path / "whole")
    same_run(whole, final(tmp_path / "split"))
    # lr (s + 1) / 2 for steps 0, 1; then 0.5 (1 + cos(pi (s - 2) / 3)) for steps 2, 3, 4
    expected = [5e-4, 1e-3, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25]
    assert whole_lrs == pytest.approx(expected, abs=1e-15) and applied == pytest.approx(expected, abs=1e-15)
    assert [h["lr"] for h in whole[1]] == pytest.approx([1e-3, 7.5e-4, 2.5e-4], abs=1e-15)  # each epoch's last
    assert {int(s["step"]) for s in whole[2].values()} == {5}  # AdamW counted 5 steps


def test_a_resume_on_changed_data_is_refused(tiny_weights, tmp_path, monkeypatch):
    """Two class folders swapped after the first epoch: the resume names the change in one line and keeps the run."""
    root = tmp_path / "data"
    cat, dog = images(root / "cat", seed=1), images(root / "dog", seed=2)
    out = str(tmp_path / "run")
    flags = [*FAST, "--dataset", str(root), "--arch", tiny_weights, "--method", "advpt", "--out", out]
    stop_after_first_checkpoint(monkeypatch, flags)
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    swap(cat, dog)
    with pytest.raises(ValueError) as e:
        train.main([*flags, "--resume"])
    message = str(e.value)
    assert "\n" not in message and message.startswith("the training data changed since the run in")
    n = len(data.build_dataset(str(root), split="train"))  # a folder without train/ splits its images
    assert f"the same {n} images of 2 classes" in message and "train anew into another --out" in message
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before  # the run is kept as it was
    swap(cat, dog)
    images(root / "owl", seed=3)
    with pytest.raises(ValueError, match=r"\(gained 1 class\(es\): owl\)"):
        train.main([*flags, "--resume"])
    os.rename(os.path.join(root, "owl"), tmp_path / "owl")
    images(root / "dog", n=12, seed=2)  # 8 more
    grown = len(data.build_dataset(str(root), split="train"))
    assert grown > n
    with pytest.raises(ValueError, match=rf"\({n} images then, {grown} now\)"):
        train.main([*flags, "--resume"])


def test_the_epoch_schedule_is_dassls_as_the_logged_run_shows():
    """nap-logged ([D] @9a9bb04e): its lr per epoch is the one logs/imagnet.out prints for epochs 1-14 of 20
    (Dassl: 1 constant warm-up epoch at 1e-6, then cosine with T_max = 20 epochs, stepped once an epoch)."""
    args = train.parse_args(["--dataset", "imagenet", "--method", "nap", "--recipe", "nap-logged"])
    logged = [1.0e-06, 1.0e-04, 9.9384e-05, 9.7553e-05, 9.4550e-05, 9.0451e-05, 8.5355e-05, 7.9389e-05, 7.2700e-05,
              6.5451e-05, 5.7822e-05, 5.0000e-05, 4.2178e-05, 3.4549e-05]
    assert [float(f"{train.learning_rate(args, e, args.epochs):.4e}") for e in range(14)] == logged


def test_the_nap_recipes_are_their_sources():
    """nap: [D] @d26abda8 (train.py:101,104; the MaPLe config; the curriculum loss); nap-logged: [D] @9a9bb04e (the
    log's 20 epochs, batch 32, 16 shots, lr 1e-4 after 1e-6; train.py:101,104 at 1/255; 0.5 CE(clean) + 0.5 CE(adv))."""
    a = train.parse_args(["--dataset", "imagenet", "--method", "nap"])
    assert (a.loss, a.optimizer, a.lr, a.weight_decay, a.schedule, a.warmup_epochs, a.warmup_lr, a.epochs, a.max_steps,
            a.shots, a.batch_size, a.eps, a.steps, a.start, a.attack_momentum, a.augment) == \
        ("curriculum", "adamw", 1e-4, 5e-4, "epoch", 1, 1e-6, 30, 0, 16, 32, 4 / 255, 5, "clean", 0.0, "crop-flip")
    assert a.alpha == pytest.approx(1.5 * (4 / 255) / 5)
    b = train.parse_args(["--dataset", "imagenet", "--method", "nap", "--recipe", "nap-logged"])
    assert (b.loss, b.clean_weight, b.optimizer, b.lr, b.warmup_epochs, b.warmup_lr, b.epochs, b.shots, b.batch_size,
            b.eps, b.steps, b.start, b.augment) == \
        ("adv", 0.5, "adamw", 1e-4, 1, 1e-6, 20, 16, 32, 1 / 255, 5, "clean", "crop-flip")
    assert b.alpha == pytest.approx(1.5 * (1 / 255) / 5)
    toy = train.parse_args(["--method", "nap", "--recipe", "nap-logged"])  # the toy keeps its changes
    assert (toy.shots, toy.epochs, toy.augment, toy.clean_weight, toy.eps) == (100, 30, "none", 0.5, 1 / 255)


def test_help_names_each_recipes_evidence(capsys):
    """--help lists every recipe with its source field, and each method's recipe with the same tags."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    for name, recipe in recipes.RECIPES.items():
        assert f"  {name}: {recipe.source}" in out
    for method, name in recipes.METHOD_RECIPE.items():
        assert f"{method}: {name} {recipes.tag(name)}" in out
    assert recipes.tag("nap") == "[D]" and recipes.tag("tecoa") == "[T]" and recipes.tag("baselines") == "[B]"
    assert "@d26abda8" in recipes.RECIPES["nap"].source and "@9a9bb04e" in recipes.RECIPES["nap-logged"].source


def test_a_full_disk_keeps_the_last_checkpoint_and_names_resume(tiny_weights, tmp_path, monkeypatch):
    """No space left while the second epoch's checkpoint is written: one line that says the last good checkpoint
    is kept and to add --resume; no partial file is left; the resumed run ends as an uninterrupted one."""
    flags = [*FAST, "--arch", tiny_weights, "--method", "advpt"]
    out, real, calls = tmp_path / "run", torch.save, []

    def full_after_first(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_first)
    with pytest.raises(OSError) as e:
        train.main([*flags, "--out", str(out)])
    monkeypatch.setattr(torch, "save", real)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"no space left on the device writing {out}")
    assert "the last good checkpoint is kept" in str(e.value) and "add --resume to the same command" in str(e.value)
    assert runtime.one_line(e.value) == str(e.value)  # what the CLI prints after "error: "
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "train.log"]
    assert nap.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 0
    train.main([*flags, "--out", str(out), "--resume"])
    train.main([*flags, "--out", str(tmp_path / "whole")])
    same_run(final(tmp_path / "whole"), final(out))
