"""evaluate.py: every accuracy with its n and Wilson interval, per-image correctness that survives a
resume and a torchrun split, PGD's two scorings kept apart, the reduced APGD-CE + APGD-T ensemble,
and the user's files (an unrelated JSON or .md, a second run on the same --out, flags that contradict
the checkpoint) refused in one line before any work."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import attacks
import data
import evaluate
import nap
import runtime
import stats
import train
from clip.model import CLIP
from conftest import ROOT, TINY, cli, one_line_error
from test_distributed import finish, torchrun

EVAL = ["--dataset", "synthetic", "--attack", "pgd", "--steps", "2", "--n-samples", "21", "--batch-size", "8",
        "--workers", "0", "--device", "cpu"]
# 3 batches; PGD whose random start dominates its two tiny steps, so that the any-iterate and last-iterate
# scorings differ (as test_distributed.py's PGD)
VARIED = ["--dataset", "synthetic-colour", "--attack", "pgd", "--steps", "2", "--n-samples", "60", "--batch-size", "20",
          "--workers", "0", "--device", "cpu", "--eps", "32/255", "--alpha", "0.01/255"]


@pytest.fixture(scope="module")
def tecoa(tiny_weights, tmp_path_factory):
    """A TeCoA checkpoint (it fine-tunes the image encoder) after one epoch on the tiny CLIP."""
    out = tmp_path_factory.mktemp("run") / "tecoa"
    train.main(["--dataset", "synthetic", "--shots", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                "--epochs", "1", "--steps", "1", "--arch", tiny_weights, "--method", "tecoa", "--out", str(out)])
    return str(out / "checkpoint.pt")


def flags(s: str) -> list:
    return [c == "1" for c in s]


# ---------------------------------------------------------------------- intervals and per-image correctness

def test_each_accuracy_has_its_n_interval_and_per_image_flags(varied_weights, tmp_path):
    out = tmp_path / "e.json"
    evaluate.main(["--arch", varied_weights, *VARIED, "--out", str(out)])
    r = json.loads(out.read_text())["synthetic-colour"]
    n, images = r["n_samples"], r["images"]
    assert n == 60 and images["evaluated"].count("1") == 60 and len(images["clean"]) == len(images["robust"]) == 60
    for key in ("clean", "robust"):
        k = images[key].count("1")
        assert r[key] == pytest.approx(100 * k / n)
        assert r[f"{key}_ci95"] == pytest.approx([100 * v for v in stats.wilson(k, n)], abs=0.006)
    # the clean flags, counted by hand on the images the record names
    ds = data.build_dataset("synthetic-colour", split="test", transform=data.eval_transform(32))
    chosen = [i for i, c in enumerate(images["evaluated"]) if c == "1"]
    model = nap.PromptedCLIP(runtime.load_backbone(varied_weights, torch.device("cpu")), ds.classnames,
                             nap.PRESETS["zeroshot"])
    with torch.no_grad():
        right = model(torch.stack([ds[i][0] for i in chosen])).argmax(1) == torch.tensor([ds.targets[i] for i in chosen])
    assert flags(images["clean"]) == right.tolist() and 0 < right.sum() < 60
    table = (tmp_path / "e.md").read_text()
    low, high = r["clean_ci95"]
    assert f"| synthetic-colour | 60 | {r['clean']:.2f} [{low:.1f}, {high:.1f}] |" in table
    assert "scored on any iterate" in table and "n 60 images" in table


def test_per_image_flags_survive_a_resume(varied_weights, tmp_path, monkeypatch):
    whole = tmp_path / "whole.json"
    evaluate.main(["--arch", varied_weights, *VARIED, "--out", str(whole)])
    real, done = evaluate.evaluate_batch, []

    def stop_after_two(*args, **kw):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kw)

    out = tmp_path / "e.json"
    monkeypatch.setattr(evaluate, "evaluate_batch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--arch", varied_weights, *VARIED, "--out", str(out)])
    monkeypatch.setattr(evaluate, "evaluate_batch", real)
    evaluate.main(["--arch", varied_weights, *VARIED, "--out", str(out)])
    a, b = (json.loads(p.read_text())["synthetic-colour"] for p in (whole, out))
    assert a["images"] == b["images"] and (a["clean"], a["robust"]) == (b["clean"], b["robust"])


def test_per_image_flags_survive_a_torchrun_split(varied_weights, tmp_path):
    """3 batches over 2 processes: every per-image flag as with one process."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    evaluate.main(["--arch", varied_weights, *VARIED, "--out", str(one)])
    finish(torchrun("evaluate.py", "--arch", varied_weights, *VARIED, "--out", str(two)))
    a, b = (json.loads(p.read_text())["synthetic-colour"] for p in (one, two))
    assert a["images"] == b["images"] and a["robust_ci95"] == b["robust_ci95"]
    assert 0 < a["images"]["robust"].count("1") < a["images"]["clean"].count("1")  # the flags tell images apart


# ---------------------------------------------------------------------- PGD's scoring

def test_last_iterate_scoring_is_never_stronger_and_is_kept_apart(varied_weights, tmp_path):
    common = ["--arch", varied_weights, *VARIED]
    evaluate.main([*common, "--out", str(tmp_path / "any.json")])
    evaluate.main([*common, "--pgd-score", "last", "--out", str(tmp_path / "last.json")])
    any_, last = (json.loads((tmp_path / f"{s}.json").read_text())["synthetic-colour"] for s in ("any", "last"))
    assert any_["images"]["evaluated"] == last["images"]["evaluated"]
    a, b = flags(any_["images"]["robust"]), flags(last["images"]["robust"])
    assert all(y for x, y in zip(a, b) if x) and sum(b) > sum(a)  # right under any -> right under last
    assert (any_["pgd_score"], last["pgd_score"], last["settings"]["pgd_score"]) == ("any", "last", "last")
    assert "scored on the last iterate" in (tmp_path / "last.md").read_text()
    assert stats.paired(last, any_)["a_only"] == sum(b) - sum(a)
    with pytest.raises(ValueError, match="other settings.*pgd_score"):  # the two scorings never share a file
        evaluate.main([*common, "--pgd-score", "last", "--out", str(tmp_path / "any.json")])
    args = evaluate.parse_args(["--pgd-score", "last"])
    assert evaluate.default_out("zeroshot", args) != evaluate.default_out("zeroshot", evaluate.parse_args([]))
    one_line_error(cli("evaluate.py", "--attack", "autoattack", "--pgd-score", "last"), "--pgd-score", "--attack pgd")


def hand_written_last_iterate_pgd(model, x, y, eps, alpha, steps, seed) -> list:
    """Per image, whether the model is right on PGD's last iterate: a uniform start in the ball drawn from a
    generator seeded with seed, then sign steps of the summed cross-entropy, projected onto the ball and box."""
    gen = torch.Generator().manual_seed(seed)
    x_adv = (x + eps * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = (x + (x_adv.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).tolist()


def test_last_scoring_equals_a_hand_written_last_iterate_pgd():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x, y = torch.rand(64, 3, 4, 4), torch.randint(0, 5, (64,))
    for eps, alpha, steps in ((16 / 255, 2 / 255, 4), (64 / 255, 0.5 / 255, 2)):
        right = hand_written_last_iterate_pgd(model, x, y, eps, alpha, steps, seed=11)
        args = SimpleNamespace(attack="pgd", eps=eps, alpha=alpha, steps=steps, pgd_score="last")
        last = evaluate.evaluate_batch(model, x, y, args, seed=11)
        assert flags(last["robust_correct"]) == right and last["robust"] == sum(right)
    any_ = evaluate.evaluate_batch(model, x, y, SimpleNamespace(**{**vars(args), "pgd_score": "any"}), seed=11)
    assert flags(any_["robust_correct"]) != right  # the reference tells the two scorings apart


def test_apgd_ce_plus_apgd_t_is_its_own_attack(varied_weights, tmp_path):
    out = tmp_path / "e.json"
    evaluate.main(["--arch", varied_weights, *VARIED, "--attack", "apgd-ce+apgd-t", "--eps", "4/255", "--out", str(out)])
    r = json.loads(out.read_text())["synthetic-colour"]
    assert r["attack"] == "apgd-ce+apgd-t" and set(r["broken_by"]) == {"apgd-ce", "apgd-t"}
    assert r["images"]["clean"].count("1") - sum(r["broken_by"].values()) == r["images"]["robust"].count("1")
    table = (tmp_path / "e.md").read_text()
    assert "attack apgd-ce+apgd-t" in table and "autoattack" not in table.lower()
    assert "eval-zeroshot-apgd-ce+apgd-t-1_255.json" in evaluate.default_out("zeroshot", evaluate.parse_args(
        ["--attack", "apgd-ce+apgd-t"]))


# ---------------------------------------------------------------------- cw, tpgd and transfer

@pytest.mark.parametrize("attack", ["cw", "tpgd", "transfer"])
def test_cw_tpgd_and_transfer_are_recorded_as_pgd_is(attack, varied_weights, tmp_path):
    out = tmp_path / "e.json"
    evaluate.main(["--arch", varied_weights, *VARIED, "--attack", attack, "--eps", "8/255", "--alpha", "2/255",
                   "--out", str(out)])
    r = json.loads(out.read_text())["synthetic-colour"]
    n, images = r["n_samples"], r["images"]
    clean, robust = flags(images["clean"]), flags(images["robust"])
    assert r["attack"] == attack and n == 60 and len(robust) == 60
    assert r["robust"] == pytest.approx(100 * sum(robust) / n)
    assert r["robust_ci95"] == pytest.approx([100 * v for v in stats.wilson(sum(robust), n)], abs=0.006)
    assert all(c for c, a in zip(clean, robust) if a) and sum(robust) < sum(clean)  # broken somewhere, never fixed
    extra = {"surrogate": "zeroshot", "diverse_inputs": 0.0} if attack == "transfer" else {}
    assert {k: r["settings"].get(k) for k in ("attack", "surrogate", "diverse_inputs")} == \
        {"attack": attack, "surrogate": None, "diverse_inputs": None, **extra}
    table = (tmp_path / "e.md").read_text()
    assert f"attack {attack}" in table and ("from zeroshot" in table) == (attack == "transfer")


def hand_written_ifgsm(model, x, y, eps, alpha, steps):
    """I-FGSM: from x, signed steps up the summed cross-entropy, projected onto the ball and box."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = (x + (x_adv.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def test_transfer_scores_the_images_crafted_on_the_surrogate():
    """--pgd-score last: right on the surrogate's I-FGSM images (written out here); any: on the clean image too."""
    torch.manual_seed(3)
    model, surrogate = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.Tanh(),
                                            torch.nn.Linear(16, 5)) for _ in range(2))
    x, y = torch.rand(64, 3, 4, 4), torch.randint(0, 5, (64,))
    eps, alpha, steps = 32 / 255, 8 / 255, 4
    args = SimpleNamespace(attack="transfer", eps=eps, alpha=alpha, steps=steps, diverse_inputs=0.0, pgd_score="last")

    def craft(images, labels, seed):
        return attacks.transfer(model, images, labels, eps, surrogate, alpha, steps, seed=seed)

    crafted = hand_written_ifgsm(surrogate, x, y, eps, alpha, steps)
    with torch.no_grad():
        right, clean = ((model(v).argmax(1) == y).tolist() for v in (crafted, x))
    last = evaluate.evaluate_batch(model, x, y, args, seed=5, craft=craft)
    any_ = evaluate.evaluate_batch(model, x, y, SimpleNamespace(**{**vars(args), "pgd_score": "any"}), seed=5,
                                   craft=craft)
    assert flags(last["robust_correct"]) == right and last["robust"] == sum(right)
    assert flags(any_["robust_correct"]) == [a and b for a, b in zip(clean, right)]
    assert 0 < any_["robust"] < last["robust"]  # some clean errors are right on their crafted image


def test_save_adv_serves_another_model_and_is_keyed_by_contents(varied_weights, tmp_path, monkeypatch, capsys):
    """Images crafted on zero-shot CLIP and kept in --save-adv are read back for another model (the same zero-shot
    CLIP under another --template: the surrogate ignores --template) with the results of a fresh crafting; another
    --diverse-inputs crafts anew; one --out holds one surrogate's results."""
    common = ["--arch", varied_weights, *VARIED, "--attack", "transfer", "--eps", "8/255", "--alpha", "2/255"]
    store, other = tmp_path / "adv", ["--template", "a blurry photo of a {}."]
    evaluate.main([*common, "--save-adv", str(store), "--out", str(tmp_path / "a.json")])
    kept = sorted(os.listdir(store))
    assert len(kept) == 3 and "3 crafted and kept there" in capsys.readouterr().out  # one file per batch
    evaluate.main([*common, *other, "--out", str(tmp_path / "fresh.json")])
    real = attacks.transfer
    monkeypatch.setattr(attacks, "transfer", lambda *a, **k: pytest.fail("crafted again"))
    evaluate.main([*common, *other, "--save-adv", str(store), "--out", str(tmp_path / "b.json")])
    assert "crafted images of 3 of 3 batches read from" in capsys.readouterr().out and sorted(os.listdir(store)) == kept
    a, fresh, b = (json.loads((tmp_path / f"{s}.json").read_text())["synthetic-colour"] for s in ("a", "fresh", "b"))
    assert b["images"] == fresh["images"] and b["clean"] != a["clean"]  # another model, the same crafted images
    monkeypatch.setattr(attacks, "transfer", real)
    evaluate.main([*common, "--diverse-inputs", "0.5", "--save-adv", str(store), "--out", str(tmp_path / "c.json")])
    assert len(os.listdir(store)) == 6
    with pytest.raises(ValueError, match="other settings.*diverse_inputs"):
        evaluate.main([*common, "--diverse-inputs", "0.5", "--out", str(tmp_path / "a.json")])
    assert "eval-zeroshot-transfer-from-zeroshot-di0.5-8_255.json" in evaluate.default_out(
        "zeroshot", evaluate.parse_args(["--attack", "transfer", "--diverse-inputs", "0.5", "--eps", "8/255"]))


def test_a_surrogate_of_another_image_size_is_refused(varied_weights, tmp_path):
    torch.manual_seed(1)
    big = str(tmp_path / "big.pt")
    torch.save(CLIP(32, 64, *TINY[2:]).state_dict(), big)  # the tiny CLIP at 64 px
    backbone = runtime.load_backbone(big, torch.device("cpu"))
    names = data.build_dataset("synthetic-colour", split="test").classnames
    ckpt = tmp_path / "run" / "checkpoint.pt"
    nap.save_checkpoint(nap.PromptedCLIP(backbone, names, nap.make_config("advvpt", depth=1)), str(ckpt), arch=big,
                        backbone=runtime.backbone_record(big))
    r = cli("evaluate.py", "--arch", varied_weights, *VARIED, "--attack", "transfer", "--surrogate", str(ckpt),
            "--out", str(tmp_path / "e.json"))
    one_line_error(r, f"--surrogate {ckpt} takes 64-px images, the model 32-px ones")
    assert not (tmp_path / "e.json").exists()


def test_a_surrogate_whose_backbone_is_gone_or_changed_says_so(varied_weights, tmp_path):
    """The surrogate's backbone comes from its own checkpoint, so the message names --surrogate, not --arch."""
    own = str(tmp_path / "own.pt")
    shutil.copy(varied_weights, own)
    backbone = runtime.load_backbone(own, torch.device("cpu"))
    names = data.build_dataset("synthetic-colour", split="test").classnames
    ckpt = tmp_path / "run" / "checkpoint.pt"
    nap.save_checkpoint(nap.PromptedCLIP(backbone, names, nap.make_config("advvpt", depth=1)), str(ckpt), arch=own,
                        backbone=runtime.backbone_record(own))
    command = ["evaluate.py", "--arch", varied_weights, *VARIED, "--attack", "transfer", "--surrogate", str(ckpt),
               "--out", str(tmp_path / "e.json")]
    torch.save({k: v + 1 for k, v in torch.load(own).items()}, own)  # another file at the same path
    r = cli(*command)
    one_line_error(r, f"{own} has SHA256")
    assert f"--surrogate {ckpt} was trained with SHA256" in r.stderr and "--arch" not in r.stderr.splitlines()[-1]
    os.remove(own)
    r = cli(*command)
    one_line_error(r, f"--surrogate {ckpt} was trained with {own}")
    assert "which is gone; put those weights back" in r.stderr and not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------------- checked before torch loads

@pytest.mark.parametrize("args,message", [
    (["--attack", "cw-l2"], "invalid choice: 'cw-l2'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--method", "nap"], "--method nap needs --checkpoint"),
    (["--device", "tpu"], "'tpu' is not a device"),
    (["--diverse-inputs", "0.5"], "--diverse-inputs is --attack transfer's"),
    (["--attack", "transfer", "--diverse-inputs", "1.5"], "--diverse-inputs 1.5 is a probability"),
    (["--checkpoint", "{tmp}/missing.pt"], "--checkpoint {tmp}/missing.pt does not exist"),
    (["--attack", "transfer", "--surrogate", "{tmp}/missing.pt"], "--surrogate {tmp}/missing.pt does not exist"),
    (["--dataset", "synthetic", "{tmp}/no/such/tree"], "no folder at"),
    (["--dataset", "caltech101", "--data-root", "{tmp}/nothing"], "--data-root {tmp}/nothing: no such folder"),
    (["--arch", "{tmp}/missing.pt"], "--arch {tmp}/missing.pt not found"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/mine.json"], "not a results file of evaluate.py"),
    (["--attack", "transfer", "--save-adv", "{tmp}/a-file"], "--save-adv {tmp}/a-file is a file"),
])
def test_bad_input_is_refused_before_torch_loads(args, message, tmp_path):
    """Each run under `python -X importtime`, whose report on stderr names every module imported."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "mine.json").write_text('{"mine": 1}')
    argv = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "evaluate.py"), *argv], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    report = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in report}
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    one_line_error(r, message.format(tmp=tmp_path))
    assert "argparse" in imported and "cmdline" in imported  # the report is there ...
    assert "torch" not in imported  # ... and torch is not in it
    assert (tmp_path / "mine.json").read_text() == '{"mine": 1}' and not (tmp_path / "runs").exists()


def test_the_methods_checked_before_torch_are_naps():
    assert set(evaluate.METHODS) == set(nap.PRESETS)


# ---------------------------------------------------------------------- the user's files

def test_a_md_beside_out_that_evaluate_did_not_write_is_refused(tiny_weights, tmp_path):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "report.md").write_text("# My report\n\nweeks of notes\n")
    r = cli("evaluate.py", "--arch", tiny_weights, *EVAL, "--out", str(docs / "report.json"))
    one_line_error(r, "report.md", "did not write", "choose another --out")
    assert (docs / "report.md").read_text() == "# My report\n\nweeks of notes\n" and not (docs / "report.json").exists()
    out = tmp_path / "e.json"
    (tmp_path / "e.md").write_text("zeroshot, attack pgd, eps 1/255, steps 2\n\n| dataset | clean | robust |\n"
                                   "|---|---:|---:|\n| synthetic | 9.52 | 4.76 |\n")  # an older evaluate.py's table
    for _ in range(2):  # its own tables are rewritten
        evaluate.main(["--arch", tiny_weights, *EVAL, "--out", str(out)])
        assert (tmp_path / "e.md").read_text().startswith(evaluate.TABLE_MARK)
    one_line_error(cli("evaluate.py", "--out", str(docs / "report.md")), "--out", "report.json")


@pytest.mark.parametrize("mine", ['{"name": "my-project", "version": 3}', "[1, 2]", "{}", "not json"])
def test_an_out_that_is_not_a_results_file_is_refused(mine, tiny_weights, tmp_path):
    out = tmp_path / "mine.json"
    out.write_text(mine)
    one_line_error(cli("evaluate.py", "--arch", tiny_weights, *EVAL, "--out", str(out)),
                   "not a results file of evaluate.py", "choose another --out")
    assert out.read_text() == mine and not (tmp_path / "mine.md").exists()


def test_a_results_list_made_by_editing_is_one_line(tiny_weights, tmp_path):
    out = tmp_path / "e.json"
    evaluate.main(["--arch", tiny_weights, *EVAL, "--out", str(out)])
    edited = json.dumps(list(json.loads(out.read_text()).values()))
    out.write_text(edited)
    one_line_error(cli("evaluate.py", "--arch", tiny_weights, *EVAL, "--out", str(out)), "not a results file")
    assert out.read_text() == edited


def test_a_second_run_on_the_same_out_is_refused(tiny_weights, tmp_path):
    """flock on <out>.lock: a run holding it refuses the next; a lock file left by a dead run does not block."""
    out = str(tmp_path / "e.json")
    with runtime.exclusive(out):
        one_line_error(cli("evaluate.py", "--arch", tiny_weights, *EVAL, "--out", out),
                       "being written by another run", f"pid {os.getpid()}")
        with pytest.raises(runtime.RunError, match="being written by another run"):  # also within one process
            evaluate.main(["--arch", tiny_weights, *EVAL, "--out", out])
        assert not os.path.exists(out)
    assert not os.path.exists(f"{out}.lock")
    with open(f"{out}.lock", "w") as f:
        f.write(f"{runtime.LOCK_TAG} {out}: pid 999999999\n")  # a run killed before it removed its lock
    evaluate.main(["--arch", tiny_weights, *EVAL, "--out", out])
    assert json.load(open(out))["synthetic"]["n_samples"] == 21 and not os.path.exists(f"{out}.lock")
    with open(f"{out}.lock", "w") as f:
        f.write("my notes")
    with pytest.raises(ValueError, match="not a lock file"):
        evaluate.main(["--arch", tiny_weights, *EVAL, "--out", out])
    assert open(f"{out}.lock").read() == "my notes"


def test_flags_that_contradict_the_checkpoint_are_refused(tecoa, tiny_weights, tmp_path):
    torch.manual_seed(5)
    other = str(tmp_path / "other.pt")
    torch.save(CLIP(*TINY).state_dict(), other)
    out = str(tmp_path / "e.json")
    one_line_error(cli("evaluate.py", "--checkpoint", tecoa, "--vision-weights", other, *EVAL, "--out", out),
                   "--vision-weights", "fine-tuned image encoder")
    one_line_error(cli("evaluate.py", "--checkpoint", tecoa, "--method", "nap", *EVAL, "--out", out),
                   "--method nap", "tecoa")
    assert not os.path.exists(out)
    evaluate.main(["--checkpoint", tecoa, "--method", "tecoa", *EVAL, "--out", out])  # the same method, said aloud
    assert json.load(open(out))["synthetic"]["identity"]["model"]["method"] == "tecoa"


def test_a_result_of_an_older_evaluate_is_recomputed_not_refused(tiny_weights, tmp_path, capsys):
    out = tmp_path / "e.json"
    evaluate.main(["--arch", tiny_weights, *EVAL, "--out", str(out)])
    new = json.loads(out.read_text())
    old = json.loads(out.read_text())
    r = old["synthetic"]
    for key in ("images", "clean_ci95", "robust_ci95", "pgd_score"):
        del r[key]
    del r["identity"]["settings"]["pgd_score"], r["settings"]["pgd_score"]
    out.write_text(json.dumps(old))
    evaluate.main(["--arch", tiny_weights, *EVAL, "--out", str(out)])
    assert "older evaluate.py" in capsys.readouterr().out
    assert json.loads(out.read_text())["synthetic"]["images"] == new["synthetic"]["images"]
