"""train.py / evaluate.py end to end on synthetic data with a tiny CLIP saved to a file; resume; bad input."""
import json
import os

import pytest
import torch

import evaluate
import nap
import runtime
import train
from conftest import cli, stop_after_first_checkpoint

FAST = ["--dataset", "synthetic", "--shots", "2", "--batch-size", "8", "--workers", "0", "--depth", "2",
        "--eps", "4/255", "--device", "cpu", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-epochs", "1"]






def test_train_then_evaluate_through_the_clis(tiny_weights, tmp_path):
    out = tmp_path / "run"
    r = cli("train.py", *FAST, "--arch", tiny_weights, "--method", "nap", "--epochs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ckpt = nap.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["arch"] == tiny_weights and ckpt["epoch"] == 1 and len(ckpt["history"]) == 2
    assert os.path.getsize(out / "checkpoint.pt") < 2_000_000 and (out / "train.log").read_text().count("epoch") >= 2
    results = tmp_path / "eval.json"
    r = cli("evaluate.py", "--checkpoint", str(out / "checkpoint.pt"), "--dataset", "synthetic", "synthetic-colour",
            "--attack", "pgd", "--eps", "4/255", "--steps", "3", "--n-samples", "24", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--out", str(results))
    assert r.returncode == 0, r.stderr
    table = json.loads(results.read_text())
    assert set(table) == {"synthetic", "synthetic-colour"}
    for row in table.values():
        assert {"clean", "robust", "attack", "eps", "steps", "n_samples", "seconds"} <= set(row)
        assert row["n_samples"] == 24 and 0 <= row["robust"] <= row["clean"] <= 100 and row["attack"] == "pgd"
        assert abs(row["eps"] - 4 / 255) < 1e-12
    assert "| **average** |" in r.stdout and (tmp_path / "eval.md").exists()
    assert not (tmp_path / "eval.json.partial" / "synthetic").exists()  # finished shards are cleaned up


def test_zeroshot_evaluation_matches_a_direct_count(tiny_weights, tmp_path):
    """The CLI's clean accuracy equals counting argmax hits of the zero-shot model by hand."""
    import data
    results = tmp_path / "zs.json"
    evaluate.main(["--arch", tiny_weights, "--dataset", "synthetic-colour", "--attack", "none", "--batch-size", "16",
                   "--workers", "0", "--device", "cpu", "--out", str(results)])
    backbone = runtime.load_backbone(tiny_weights, torch.device("cpu"))
    ds = data.build_dataset("synthetic-colour", split="test", transform=data.eval_transform(32))
    model = nap.PromptedCLIP(backbone, ds.classnames, nap.PRESETS["zeroshot"])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        hits = (model(x).argmax(1) == torch.tensor(ds.targets)).sum().item()
    row = json.loads(results.read_text())["synthetic-colour"]
    assert row["robust"] is None and row["clean"] == pytest.approx(100 * hits / len(ds))


def test_resume_reaches_the_uninterrupted_result(tiny_weights, tmp_path, monkeypatch):
    """Interrupted after its first epoch, then resumed with the same command: the same model as three epochs straight."""
    common = [*FAST, "--arch", tiny_weights, "--method", "advvlp", "--seed", "3", "--epochs", "3"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    stop_after_first_checkpoint(monkeypatch, [*common, "--out", str(tmp_path / "resumed")])
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    a = nap.load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    b = nap.load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))
    assert a["epoch"] == b["epoch"] == 2
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_every_loss_trains(tiny_weights, tmp_path):
    for loss in train.LOSSES:
        method = "fare" if loss == "fare" else "nap"
        train.main([*FAST, "--arch", tiny_weights, "--method", method, "--epochs", "1", "--loss", loss,
                    "--out", str(tmp_path / loss)])
        history = nap.load_checkpoint(str(tmp_path / loss / "checkpoint.pt"))["history"]
        assert torch.isfinite(torch.tensor(history[0]["loss"])), loss


def test_evaluation_resumes_from_finished_batches(tiny_weights, tmp_path, monkeypatch):
    """Batches already written are not attacked again, and their stored counts enter the result."""
    calls = []
    real = evaluate.evaluate_batch
    monkeypatch.setattr(evaluate, "evaluate_batch", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    out = tmp_path / "e.json"
    args = ["--arch", tiny_weights, "--dataset", "synthetic", "--attack", "pgd", "--steps", "2", "--n-samples", "24",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out)]
    evaluate.main(args)
    assert len(calls) == 3
    first = calls[:]
    assert json.loads(out.read_text())["synthetic"]["clean"] == pytest.approx(100 * sum(c["clean"] for c in first) / 24)
    out.unlink()  # as if interrupted after batch 0: its file is there, the results file is not
    partial = tmp_path / "e.json.partial" / "synthetic"
    partial.mkdir(parents=True)
    (partial / "batch000000.json").write_text(json.dumps({"n": 8, "clean": 8, "robust": 0}))
    calls.clear()
    evaluate.main(args)
    assert len(calls) == 2 and calls == first[1:]
    row = json.loads(out.read_text())["synthetic"]
    assert row["clean"] == pytest.approx(100 * (8 + first[1]["clean"] + first[2]["clean"]) / 24)
    assert row["robust"] == pytest.approx(100 * (first[1]["robust"] + first[2]["robust"]) / 24)


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--dataset", "no_such_set"], "unknown dataset 'no_such_set'"),
    ("train.py", ["--dataset", "caltech101", "--arch", "{w}", "--data-root", "{tmp}"], "caltech-101"),
    ("train.py", ["--eps", "abc"], "--eps"),
    ("train.py", ["--arch", "{tmp}/missing.pt"], "not found"),
    ("train.py", ["--arch", "{tmp}/corrupt.pt"], "neither a TorchScript archive nor a state_dict"),
    ("train.py", ["--arch", "{w}", "--method", "nap", "--loss", "fare"], "--loss fare trains the image encoder"),
    ("evaluate.py", ["--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    ("evaluate.py", ["--checkpoint", "{tmp}/corrupt.pt"], "corrupt"),
    ("evaluate.py", ["--method", "nap"], "needs --checkpoint"),
    ("evaluate.py", ["--arch", "{w}", "--dataset", "{tmp}/no/such/tree"], "no folder"),
    ("evaluate.py", ["--attack", "cw-l2"], "invalid choice"),
])
def test_bad_input_is_one_clear_line(script, args, message, tiny_weights, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00 not a torch file")
    args = [a.format(w=tiny_weights, tmp=tmp_path) for a in args]
    r = cli(script, *args, "--device", "cpu", "--workers", "0", cwd=str(tmp_path))
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_existing_run_is_not_overwritten(tiny_weights, tmp_path):
    out = tmp_path / "run"
    train.main([*FAST, "--arch", tiny_weights, "--method", "advpt", "--epochs", "1", "--out", str(out)])
    with pytest.raises(ValueError, match="pass --resume"):
        train.main([*FAST, "--arch", tiny_weights, "--method", "advpt", "--epochs", "1", "--out", str(out)])
    with pytest.raises(ValueError, match="other settings"):
        train.main([*FAST, "--arch", tiny_weights, "--method", "nap", "--epochs", "2", "--out", str(out), "--resume"])


def test_each_method_trains_with_its_sources_recipe():
    """nap: [D]'s curriculum + AdamW at 4/255 (PGD-5 from the clean image); the prompt baselines: [B]'s half + SGD
    at 1/255 (PGD-2, random start); --recipe swaps the family; explicit flags win; the toy changes only its budget."""
    nap_args = train.parse_args(["--dataset", "caltech101", "--method", "nap"])
    assert (nap_args.loss, nap_args.optimizer, nap_args.lr, nap_args.epochs, nap_args.shots) == ("curriculum", "adamw", 1e-4, 30, 16)
    assert (nap_args.eps, nap_args.steps, nap_args.start, nap_args.warmup_lr) == (4 / 255, 5, "clean", 1e-6)
    assert nap_args.alpha == pytest.approx(1.5 * (4 / 255) / 5) and nap_args.augment == "crop-flip"
    for method in ("advpt", "advvpt", "advvlp", "advmaple"):
        a = train.parse_args(["--dataset", "caltech101", "--method", method])
        assert (a.loss, a.optimizer, a.lr, a.weight_decay, a.epochs, a.shots, a.batch_size) == ("half", "sgd", 0.0035, 5e-4, 100, 16, 32)
        assert (a.eps, a.alpha, a.steps, a.start, a.warmup_epochs, a.warmup_lr) == (1 / 255, 1 / 255, 2, "random", 1, 1e-5)
    swapped = train.parse_args(["--dataset", "caltech101", "--method", "advmaple", "--recipe", "nap"])
    assert (swapped.loss, swapped.eps, swapped.steps) == ("curriculum", 4 / 255, 5)
    swapped = train.parse_args(["--dataset", "caltech101", "--method", "nap", "--recipe", "baselines"])
    assert (swapped.loss, swapped.eps, swapped.optimizer) == ("half", 1 / 255, "sgd")
    toy = train.parse_args(["--method", "advvlp"])  # synthetic data -> the toy CLIP
    assert (toy.arch, toy.shots, toy.epochs, toy.augment, toy.loss, toy.eps) == ("toy", 100, 30, "none", "half", 1 / 255)
    mine = train.parse_args(["--method", "nap", "--eps", "1/255", "--loss", "adv", "--shots", "16", "--lr", "0.01"])
    assert (mine.eps, mine.loss, mine.shots, mine.lr, mine.optimizer) == (1 / 255, "adv", 16, 0.01, "adamw")
    assert mine.alpha == pytest.approx(0.3 / 255)  # the recipe's step scales with the radius actually used
    assert train.parse_args(["--method", "nap", "--eps", "2/255", "--alpha", "1/255"]).alpha == 1 / 255


def test_toy_checkpoints_are_evaluated_at_the_papers_radius(tiny_weights, tmp_path, monkeypatch):
    """--arch toy (here with a tiny stand-in backbone) trains NAP at 4/255 as its source does, and every
    evaluation is at 1/255 unless --eps says otherwise."""
    real = runtime.load_backbone
    monkeypatch.setattr(runtime, "load_backbone", lambda arch, *a, **k: real(tiny_weights if arch == "toy" else arch, *a, **k))
    monkeypatch.setattr(runtime, "backbone_file", lambda arch: tiny_weights if arch == "toy" else arch)
    out = tmp_path / "toy"
    train.main(["--arch", "toy", "--shots", "2", "--epochs", "1", "--batch-size", "8", "--depth", "2", "--workers", "0",
                "--device", "cpu", "--out", str(out)])
    ckpt = nap.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["arch"] == "toy" and ckpt["args"]["loss"] == "curriculum" and ckpt["args"]["eps"] == 4 / 255
    common = ["--dataset", "synthetic", "--steps", "1", "--n-samples", "8", "--workers", "0", "--device", "cpu"]
    evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), *common, "--out", str(tmp_path / "a.json")])
    evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), *common, "--eps", "2/255", "--out", str(tmp_path / "b.json")])
    evaluate.main(["--arch", tiny_weights, *common, "--out", str(tmp_path / "c.json")])
    eps = [json.loads((tmp_path / f"{n}.json").read_text())["synthetic"]["eps"] for n in "abc"]
    assert eps == [1 / 255, 2 / 255, 1 / 255]
