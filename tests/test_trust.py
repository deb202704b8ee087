"""Runs either right or refused in one line: results keyed by what produced them, exact resumes, the
sources' recipes, precision that keeps the perturbation, one-line errors for users and tracebacks for bugs."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import nap
import runtime
import train
from clip.model import CLIP
from conftest import ROOT, TINY, cli, one_line_error, stop_after_first_checkpoint

FAST = ["--dataset", "synthetic", "--shots", "2", "--batch-size", "8", "--workers", "0", "--depth", "2",
        "--device", "cpu", "--epochs", "2"]
EVAL = ["--attack", "pgd", "--steps", "1", "--n-samples", "16", "--batch-size", "8", "--workers", "0", "--device", "cpu"]




@pytest.fixture(scope="module")
def trained(tiny_weights, tmp_path_factory):
    """A two-epoch NAP checkpoint on the tiny CLIP."""
    out = tmp_path_factory.mktemp("run") / "nap"
    train.main([*FAST, "--arch", tiny_weights, "--method", "nap", "--out", str(out)])
    return str(out / "checkpoint.pt")


def counting(monkeypatch):
    """Counts the batches evaluate.py attacks."""
    calls = []
    real = evaluate.evaluate_batch
    monkeypatch.setattr(evaluate, "evaluate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def image_tree(root, seed=0, classes=("cat", "dog"), n=4):
    """root/test/<class>/<i>.png and root/train/<class>/<i>.png: tiny random images."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


# ---------------------------------------------------------------------- 1. results keyed by what produced them

def test_a_retrained_checkpoint_is_evaluated_again(trained, tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "checkpoint.pt")
    shutil.copy(trained, path)
    calls, out = counting(monkeypatch), str(tmp_path / "e.json")
    args = ["--checkpoint", path, "--dataset", "synthetic", *EVAL, "--out", out]
    evaluate.main(args)
    first = json.load(open(out))["synthetic"]
    evaluate.main(args)  # nothing changed: reused, and said so
    assert len(calls) == 2 and "reusing the finished result" in capsys.readouterr().out
    ckpt = nap.load_checkpoint(path)
    ckpt["trainable"] = {k: v + 0.5 for k, v in ckpt["trainable"].items()}
    nap.atomic_save(ckpt, path)  # retrained at the same path
    evaluate.main(args)
    assert len(calls) == 4 and "checkpoint_sha256 changed since" in capsys.readouterr().out
    now = json.load(open(out))["synthetic"]
    assert now["contents"]["checkpoint_sha256"] != first["contents"]["checkpoint_sha256"]
    evaluate.main(["--checkpoint", path, "--dataset", "synthetic", *EVAL, "--out", str(tmp_path / "fresh.json")])
    fresh = json.load(open(tmp_path / "fresh.json"))["synthetic"]
    assert (now["clean"], now["robust"]) == (fresh["clean"], fresh["robust"])


def test_changed_data_is_evaluated_again(tiny_weights, tmp_path, monkeypatch, capsys):
    calls, tree = counting(monkeypatch), image_tree(tmp_path / "data")
    args = ["--arch", tiny_weights, "--dataset", tree, *EVAL, "--out", str(tmp_path / "e.json")]
    evaluate.main(args)
    n = len(calls)
    Image.new("RGB", (48, 48), (255, 0, 0)).save(os.path.join(tree, "test", "cat", "0.png"))  # new contents
    evaluate.main(args)
    assert len(calls) == 2 * n and "changed since" in capsys.readouterr().out


def test_batches_of_two_folders_of_one_name_are_kept_apart(tiny_weights, tmp_path, monkeypatch, capsys):
    """An interrupted run on /a/data, then /b/data with the same --out: a's batches are neither counted as b's
    nor discarded by b's run; a resumes from them."""
    a, b = image_tree(tmp_path / "a" / "data", seed=1), image_tree(tmp_path / "b" / "data", seed=2)
    out = str(tmp_path / "e.json")
    real, done = evaluate.evaluate_batch, []

    def stop_after_one(*args, **kw):
        if done:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(evaluate, "evaluate_batch", stop_after_one)
    common = ["--arch", tiny_weights, *EVAL, "--batch-size", "4"]
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*common, "--out", out, "--dataset", a])
    kept = [os.path.join(f"{out}.partial", d) for d in os.listdir(f"{out}.partial")]
    assert len(kept) == 1 and "batch000000.json" in os.listdir(kept[0])  # a's finished batch is kept for a resume
    monkeypatch.setattr(evaluate, "evaluate_batch", real)
    evaluate.main([*common, "--out", out, "--dataset", b])
    assert "discarding" not in capsys.readouterr().out and "batch000000.json" in os.listdir(kept[0])
    evaluate.main([*common, "--out", str(tmp_path / "b.json"), "--dataset", b])
    assert json.load(open(out))[b]["images"] == json.load(open(tmp_path / "b.json"))[b]["images"]
    evaluate.main([*common, "--out", out, "--dataset", a])
    assert "reusing 1 of 2 batches" in capsys.readouterr().out and not os.path.exists(f"{out}.partial")
    evaluate.main([*common, "--out", str(tmp_path / "a.json"), "--dataset", a])
    assert json.load(open(out))[a]["images"] == json.load(open(tmp_path / "a.json"))[a]["images"]


def test_default_out_names_attack_and_eps(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for eps in ("1/255", "4/255"):
        evaluate.main(["--arch", tiny_weights, "--dataset", "synthetic", *EVAL, "--eps", eps])
    one, four = (json.load(open(f"runs/eval-zeroshot-pgd-{e}_255.json"))["synthetic"]["eps"] for e in ("1", "4"))
    assert (one, four) == (1 / 255, 4 / 255)


def test_explicit_out_of_other_settings_is_refused(tiny_weights, tmp_path):
    out = str(tmp_path / "e.json")
    evaluate.main(["--arch", tiny_weights, "--dataset", "synthetic", *EVAL, "--out", out])
    before = open(out).read()
    with pytest.raises(ValueError, match="other settings.*eps.*choose another --out"):
        evaluate.main(["--arch", tiny_weights, "--dataset", "synthetic", *EVAL, "--eps", "2/255", "--out", out])
    assert open(out).read() == before  # nothing the user made is lost


# ---------------------------------------------------------------------- 2. resume continues the run that was started

def test_resume_refuses_every_changed_setting_and_keeps_the_record(tiny_weights, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    stop_after_first_checkpoint(monkeypatch, [*FAST, "--arch", tiny_weights, "--method", "advvlp", "--out", out])
    record = nap.load_checkpoint(os.path.join(out, "checkpoint.pt"))["args"]
    base = [*FAST, "--arch", tiny_weights, "--method", "advvlp", "--out", out, "--resume"]
    with pytest.raises(ValueError) as e:
        train.main([*base, "--eps", "8/255", "--loss", "trades", "--lr", "1", "--batch-size", "4"])
    message = str(e.value)
    assert "\n" not in message
    for fragment in ("--eps 1/255 (now 8/255)", "--loss half (now trades)", "--lr 0.0035 (now 1.0)", "--batch-size 8 (now 4)"):
        assert fragment in message
    with pytest.raises(ValueError, match="--optimizer sgd"):  # was KeyError 'step'
        train.main([*base, "--optimizer", "adamw"])
    train.main([*base, "--workers", "0"])  # run-only flags may change
    ckpt = nap.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["args"] == record and ckpt["epoch"] == 1


def test_ctrl_c_keeps_the_epochs_and_names_resume(tiny_weights, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--epochs", "500", "--arch", tiny_weights,
                          "--method", "advpt", "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 900
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=600)[1]
    assert p.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "--resume" in err.strip().splitlines()[-1]
    assert nap.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] >= 0


# ---------------------------------------------------------------------- 3. the sources' recipes

def test_trades_attacks_the_kl_from_a_tiny_gaussian_start(monkeypatch):
    """[B] trades.py: the attack ascends KL(f(x) || f(x')) from x + 0.001 N(0, 1); beta 1."""
    args = train.parse_args(["--dataset", "caltech101", "--method", "advvlp", "--loss", "trades"])
    assert args.beta == 1.0
    torch.manual_seed(0)
    model = nap.PromptedCLIP(CLIP(*TINY).eval(), ["cat", "dog", "car"], nap.make_config("advvlp", depth=2))
    seen = {}
    real = train.attacks.pgd
    monkeypatch.setattr(train.attacks, "pgd", lambda *a, **k: seen.update(k, x=a[1]) or real(*a, **k))
    x, y = torch.rand(4, 3, 32, 32) * 0.8 + 0.1, torch.tensor([0, 1, 2, 0])
    noise = torch.rand_like(x) * 2 - 1
    train.AdversarialStep(model, args)(x, y, noise, torch.zeros(4, dtype=torch.bool), 0)
    start = seen["x_init"] - x
    assert 0.0007 < start.std() < 0.0013 and abs(start.mean()) < 2e-4  # x + 0.001 N(0, 1)
    with torch.no_grad():
        z = model(x)
        kl = seen["loss"](z, y)
    assert kl.shape == (4,) and torch.allclose(kl, torch.zeros(4), atol=1e-5)  # KL of the clean point with itself


def test_half_splits_the_global_batch_as_one_process_does():
    """2 processes keep clean exactly the images 1 process keeps clean; each half's accuracy counts its own images."""
    one = train.epoch_batches(40, 16, 3, 1, runtime.World())
    two = [train.epoch_batches(40, 16, 3, 1, runtime.World(r, 2)) for r in range(2)]
    for b, (idx, mask) in enumerate(one):
        clean = {i for i, m in zip(idx, mask) if m}
        assert len(clean) == 8 and clean == {i for r in range(2) for i, m in zip(*two[r][b]) if m}
        assert set(idx) == set(two[0][b][0]) | set(two[1][b][0])
    args = train.parse_args(["--dataset", "caltech101", "--method", "advvlp"])
    y, mask = torch.tensor([0, 1, 0, 1]), torch.tensor([True, True, False, False])
    clean, adv = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[1.0, 0], [1, 0]])  # clean 2/2, adv 1/2
    record = train.epoch_record(0, args, train.batch_totals(torch.tensor(1.0), clean, adv, y, mask, args))
    assert (record["clean_acc"], record["adv_acc"]) == (100.0, 50.0)


def test_a_collapse_is_named():
    flat = [{"adv_acc": 10.0, "adv_ce": 2.30} for _ in range(3)]
    assert train.collapsed(flat, 10) and not train.collapsed(flat[:2], 10)
    assert not train.collapsed([*flat[:2], {"adv_acc": 30.0, "adv_ce": 1.5}], 10)


# ---------------------------------------------------------------------- 4. precision keeps the threat model

def perturbation_at_block_one(model, precision, x, delta):
    """h(x + delta) - h(x) as the first vision block receives it, under the runtime's weights and autocast."""
    seen = []
    hook = model.clip.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
    with torch.no_grad(), runtime.autocast(torch.device("cpu"), precision):
        model.encode_image(x + delta)
        model.encode_image(x)
    hook.remove()
    return seen[0] - seen[1]


def test_precision_keeps_the_perturbation_entering_the_first_block(tmp_path):
    """fp32's perturbation at block 1 vs fp16 / bf16 (the runtime's weights and autocast): the normalisation and
    the patch embedding stay float32 and the residual stream is not rounded; rounding the pixels first, as a
    16-bit patch embedding does, distorts it by percents."""
    torch.manual_seed(0)
    path = str(tmp_path / "w.pt")
    torch.save(CLIP(512, 64, 2, 768, 16, 77, 49408, 512, 8, 2).state_dict(), path)  # ViT-B width, 2 layers
    x = torch.rand(2, 3, 64, 64) * 0.9 + 0.05
    delta = (torch.randint(0, 2, x.shape) * 2 - 1) / 255  # a corner of the 1/255 ball
    cfg = nap.make_config("advvlp", depth=2)
    want = perturbation_at_block_one(nap.PromptedCLIP(runtime.load_backbone(path, torch.device("cpu")), ["a", "b"], cfg),
                                     "fp32", x, delta)
    for precision in ("fp16", "bf16"):
        model = nap.PromptedCLIP(runtime.load_backbone(path, torch.device("cpu"), precision), ["a", "b"], cfg)
        model.load_state_dict({k: v for k, v in nap.PromptedCLIP(runtime.load_backbone(path, torch.device("cpu")),
                                                                   ["a", "b"], cfg).state_dict().items()
                               if not k.startswith("clip.")}, strict=False)
        got = perturbation_at_block_one(model, precision, x, delta)
        assert ((got - want).norm() / want.norm()) < 1e-5, precision  # measured: 0 (the same float32 computation)
        rounded = (x + delta).to(runtime.DTYPES[precision]).float() - x.to(runtime.DTYPES[precision]).float()
        assert ((rounded - delta).norm() / delta.norm()) > 0.005  # what 16-bit pixels would have cost


def test_bf16_below_4_255_is_warned_about(capsys):
    assert runtime.resolve_precision("bf16", torch.device("cpu"), 1 / 255) == "bf16"
    assert "bf16" in capsys.readouterr().err
    runtime.resolve_precision("bf16", torch.device("cpu"), 4 / 255)
    assert capsys.readouterr().err == ""
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"


# ---------------------------------------------------------------------- 5. zero-shot CLIP as the baselines score it

def test_zero_shot_uses_coop_templates(tiny_weights, tmp_path):
    args = evaluate.parse_args([])
    assert evaluate.zero_shot_template("oxford_pets", args.template) == "a photo of a {}, a type of pet."
    assert evaluate.zero_shot_template("eurosat", args.template) == "a centered satellite photo of {}."
    assert evaluate.zero_shot_template(str(tmp_path), args.template) == "a photo of a {}."
    chosen = evaluate.parse_args(["--template", "a photo of a {}."]).template
    assert evaluate.zero_shot_template("eurosat", chosen) == "a photo of a {}."
    out = str(tmp_path / "e.json")
    evaluate.main(["--arch", tiny_weights, "--dataset", "synthetic", *EVAL, "--template", "an image of a {}.", "--out", out])
    assert json.load(open(out))["synthetic"]["template"] == "an image of a {}."


# ---------------------------------------------------------------------- 7. one clear line for users, tracebacks for bugs

@pytest.mark.parametrize("case", ["out-is-file", "out-is-dir", "out-read-only", "device", "depth0", "weights-gone"])
def test_bad_input_is_one_line(case, tiny_weights, trained, tmp_path):
    (tmp_path / "afile").write_text("mine")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    base = ["--dataset", "synthetic", "--workers", "0"]
    if case == "out-is-file":
        r = cli("train.py", *base, "--arch", tiny_weights, "--out", str(tmp_path / "afile"), "--device", "cpu")
        one_line_error(r, "is a file")
        assert (tmp_path / "afile").read_text() == "mine"
    elif case == "out-is-dir":
        one_line_error(cli("evaluate.py", *base, "--arch", tiny_weights, "--out", str(tmp_path), "--device", "cpu"), "is a folder")
    elif case == "out-read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        one_line_error(cli("train.py", *base, "--arch", tiny_weights, "--out", str(ro / "run")), "cannot be written")
    elif case == "device":
        one_line_error(cli("evaluate.py", *base, "--arch", tiny_weights, "--device", "tpu"), "--device", "cpu")
    elif case == "depth0":
        one_line_error(cli("train.py", *base, "--depth", "0"), "--depth must be >= 1")
    elif case == "weights-gone":
        ckpt = nap.load_checkpoint(trained)
        ckpt["arch"] = ckpt["backbone"]["arch"] = str(tmp_path / "gone.pt")
        nap.atomic_save(ckpt, str(tmp_path / "c.pt"))
        one_line_error(cli("evaluate.py", "--checkpoint", str(tmp_path / "c.pt"), *base, "--device", "cpu"), "gone", "--arch")


def test_a_different_backbone_file_is_refused(trained, tmp_path):
    torch.manual_seed(5)
    other = str(tmp_path / "other.pt")
    torch.save(CLIP(*TINY).state_dict(), other)
    with pytest.raises(ValueError, match="SHA256.*trained with"):
        evaluate.main(["--checkpoint", trained, "--arch", other, "--dataset", "synthetic", *EVAL,
                       "--out", str(tmp_path / "e.json")])


def run_cli_with(error, capsys):
    """runtime.run_cli on a main() that raises error -> (exit code or the escaping exception, stderr)."""
    def main():
        raise error
    try:
        runtime.run_cli(main)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except BaseException as e:
        return e, capsys.readouterr().err


def test_bugs_keep_their_traceback(capsys):
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("step"), TypeError("x")):
        escaped, _ = run_cli_with(bug, capsys)
        assert escaped is bug  # not swallowed into one line: Python prints its traceback
    code, err = run_cli_with(torch.OutOfMemoryError("CUDA out of memory"), capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: out of memory")
    assert "--batch-size" in err.strip().splitlines()[-1]
    code, err = run_cli_with(ValueError("--eps: expected 1/255\nmore"), capsys)
    assert code == 2 and err.strip() == "error: --eps: expected 1/255"
    code, err = run_cli_with(OSError(errno.ENOSPC, "No space left on device", "runs/x.json"), capsys)
    assert code == 2 and "no space left" in err and "runs/x.json" in err and len(err.strip().splitlines()) == 1


def test_the_library_refuses_what_it_would_misread():
    model = CLIP(*TINY).eval()
    with pytest.raises(ValueError, match="list of class-name strings"):
        nap.PromptedCLIP(model, "cat", nap.PRESETS["zeroshot"])  # not the classes c, a, t
    with pytest.raises(ValueError, match="same prompt twice"):
        nap.PromptedCLIP(model, ["big_cat", "big cat"], nap.PRESETS["zeroshot"])
    prompted = nap.PromptedCLIP(model, ["cat", "dog"], nap.PRESETS["zeroshot"])
    with pytest.raises(ValueError, match="floats in \\[0, 1\\]"):
        prompted(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="divide by 255"):
        prompted(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        nap.make_config("nap", depth=0)


def test_a_full_disk_while_writing_results_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "r.json")
    runtime.write_json({"a": 1}, path)

    def full(obj, f, **kw):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError):
        runtime.write_json({"a": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["r.json"] and json.load(open(path)) == {"a": 1}
