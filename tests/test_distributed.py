"""torchrun on CPU (gloo, 2 processes on 127.0.0.1) against one process: sharded evaluation gives the
same numbers exactly, DDP training the same prompts with the same global batch, and a killed run
(training or evaluation) resumes with another number of processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import evaluate
import nap
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4
# --n-ctx 2: a run that learns. With the preset's 16 random tokens this tiny run collapses to chance, where AdamW's
# normalised steps amplify the float summation-order difference of DDP's gradient all-reduce past the tolerance.
TRAIN = ["--dataset", "synthetic", "--method", "nap", "--depth", "2", "--n-ctx", "2", "--shots", "4", "--batch-size", "8",
         "--eps", "4/255", "--steps", "2", "--optimizer", "adamw", "--lr", "5e-3", "--seed", "5", "--workers", "0",
         "--device", "cpu"]
BATCHES = 13  # per dataset: 12 of 7 images and one of 6
# PGD whose steps are too small to matter next to its random start, so a batch attacked with another seed
# than (seed + batch index) changes the counts
PGD = ["--dataset", "synthetic", "synthetic-colour", "--attack", "pgd", "--eps", "32/255", "--alpha", "0.01/255",
       "--steps", "2", "--n-samples", "90", "--batch-size", "7", "--seed", "3", "--workers", "0", "--device", "cpu"]
AUTOATTACK = ["--dataset", "synthetic", "--attack", "autoattack", "--eps", "4/255", "--steps", "2", "--queries", "20",
              "--n-samples", "16", "--batch-size", "8", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_weights(varied_weights):
    """conftest's varied_weights: the tiny CLIP whose predictions (and counts) depend on the pixels."""
    return varied_weights


def torchrun(script, *args, nproc=2, log=None):
    """Starts `torchrun --nproc_per_node nproc script args` on 127.0.0.1 in its own process group; -> Popen."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.join(ROOT, script), *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc) -> str:
    """Waits for a torchrun started without a log; -> its output, asserting it succeeded."""
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out
    return out


def kill_when(proc, path_exists, what):
    """SIGTERMs the torchrun (which takes its workers down) as soon as path_exists() holds."""
    deadline = time.time() + 900
    while not path_exists():
        assert proc.poll() is None, f"torchrun exited ({proc.returncode}) before {what} appeared"
        assert time.time() < deadline, f"no {what} after 900 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=600) != 0


# ---------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def pgd_reference(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1") / "e.json"
    evaluate.main([*PGD, "--arch", tiny_weights, "--out", str(out)])
    return json.loads(out.read_text())


def rows(results):
    return {d: {k: r.get(k) for k in ("clean", "robust", "n_samples", "broken_by")} for d, r in results.items()}


def test_sharded_pgd_evaluation_equals_one_process(tiny_weights, pgd_reference, tmp_path):
    """13 batches (the last one short) over 2 ranks, two datasets: every number as with one process."""
    out = tmp_path / "e.json"
    stdout = finish(torchrun("evaluate.py", *PGD, "--arch", tiny_weights, "--out", str(out)))
    assert rows(json.loads(out.read_text())) == rows(pgd_reference)
    ref = pgd_reference["synthetic"]
    assert ref["n_samples"] == 90 and 0 < ref["robust"] < ref["clean"]  # the attack breaks some, not all
    assert stdout.count("results:") == 1 and stdout.count("| synthetic-colour |") == 1  # rank 0 reports alone
    assert not (tmp_path / "e.json.partial" / "synthetic").exists()


def test_sharded_autoattack_equals_one_process(tiny_weights, tmp_path):
    """AutoAttack's clean/robust counts and per-member counts are summed exactly."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    evaluate.main([*AUTOATTACK, "--arch", tiny_weights, "--out", str(one)])
    finish(torchrun("evaluate.py", *AUTOATTACK, "--arch", tiny_weights, "--out", str(two)))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert rows(a) == rows(b) and set(a["synthetic"]["broken_by"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}


def test_killed_sharded_evaluation_resumes_with_one_process(tiny_weights, pgd_reference, tmp_path, monkeypatch):
    """Shards finished by 2 ranks before a SIGTERM are kept and reused; the result is the uninterrupted one."""
    out = tmp_path / "e.json"
    partial = tmp_path / "e.json.partial" / "synthetic"
    proc = torchrun("evaluate.py", *PGD, "--arch", tiny_weights, "--out", str(out), log=tmp_path / "log")
    kill_when(proc, lambda: any(partial.glob("batch*.json")), "finished batch")
    kept = len(list(partial.glob("batch*.json")))
    assert 1 <= kept < BATCHES and not out.exists(), (tmp_path / "log").read_text()
    calls = []
    real = evaluate.evaluate_batch
    monkeypatch.setattr(evaluate, "evaluate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate.main([*PGD, "--arch", tiny_weights, "--out", str(out)])
    assert len(calls) == BATCHES - kept + BATCHES  # the rest of synthetic, all of synthetic-colour
    assert rows(json.loads(out.read_text())) == rows(pgd_reference)


def test_batches_of_an_interrupted_run_with_other_settings_are_not_counted(tiny_weights, pgd_reference, tmp_path,
                                                                            monkeypatch):
    """Stopped after 3 batches at --eps 128/255, then run at the reference settings: the reference numbers."""
    out, real, done = tmp_path / "e.json", evaluate.evaluate_batch, []

    def stop_after_three(*args, **kwargs):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(real(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(evaluate, "evaluate_batch", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*PGD, "--arch", tiny_weights, "--eps", "128/255", "--out", str(out)])
    assert len(list((tmp_path / "e.json.partial" / "synthetic").glob("batch*.json"))) == 3
    monkeypatch.setattr(evaluate, "evaluate_batch", real)
    evaluate.main([*PGD, "--arch", tiny_weights, "--out", str(out)])
    assert rows(json.loads(out.read_text())) == rows(pgd_reference)


# ---------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def one_process(tiny_weights, tmp_path_factory):
    """The checkpoint after EPOCHS epochs in one process with global batch 8."""
    out = tmp_path_factory.mktemp("train1")
    train.main([*TRAIN, "--arch", tiny_weights, "--epochs", str(EPOCHS), "--out", str(out)])
    return nap.load_checkpoint(str(out / "checkpoint.pt"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_process_training_equals_one_process(tiny_weights, one_process, tmp_path):
    """--batch-size is global: 2 x 4 images per step under DDP == 8 in one process, != 16 in one process."""
    finish(torchrun("train.py", *TRAIN, "--arch", tiny_weights, "--epochs", str(EPOCHS),
                    "--out", str(tmp_path / "two")))
    two = nap.load_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    assert two["epoch"] == EPOCHS - 1 and max_difference(two["trainable"], one_process["trainable"]) < 1e-4
    for a, b in zip(two["history"], one_process["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["adv_acc"] == b["adv_acc"]
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count(" start ") == 1 and log.count("loss ") == EPOCHS  # rank 0 alone writes
    train.main([*TRAIN, "--arch", tiny_weights, "--epochs", str(EPOCHS), "--batch-size", "16",
                "--out", str(tmp_path / "per_rank")])
    other = nap.load_checkpoint(str(tmp_path / "per_rank" / "checkpoint.pt"))
    assert max_difference(other["trainable"], one_process["trainable"]) > 1e-2  # the tolerance tells them apart


def test_killed_two_process_training_resumes_with_one_process(tiny_weights, one_process, tmp_path):
    """SIGTERM after the first checkpoint, resume alone: the final epoch is reached with the uninterrupted prompts."""
    out = tmp_path / "run"
    args = [*TRAIN, "--arch", tiny_weights, "--epochs", str(EPOCHS), "--out", str(out)]
    proc = torchrun("train.py", *args, log=tmp_path / "log")
    kill_when(proc, (out / "checkpoint.pt").exists, "checkpoint.pt")
    killed = nap.load_checkpoint(str(out / "checkpoint.pt"))
    assert killed["epoch"] < EPOCHS - 1, "the run finished before it was killed"
    assert max_difference(killed["trainable"], one_process["trainable"]) > 1e-2  # a mid-way state
    train.main([*args, "--resume"])
    resumed = nap.load_checkpoint(str(out / "checkpoint.pt"))
    assert resumed["epoch"] == EPOCHS - 1 and len(resumed["history"]) == EPOCHS
    assert max_difference(resumed["trainable"], one_process["trainable"]) < 1e-4
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, EPOCHS + 1))


def test_half_loss_over_two_processes_equals_one_process(tiny_weights, tmp_path):
    """`half` keeps the first half of the global batch clean whichever process holds it; torchrun without
    --device resolves 'auto' per rank (gloo on the CPU)."""
    args = [a for a in TRAIN if a not in ("--device", "cpu")] + ["--arch", tiny_weights, "--loss", "half", "--epochs", "2"]
    finish(torchrun("train.py", *args, "--out", str(tmp_path / "two")))
    train.main([*args, "--device", "cpu", "--out", str(tmp_path / "one")])
    two, one = (nap.load_checkpoint(str(tmp_path / n / "checkpoint.pt")) for n in ("two", "one"))
    assert max_difference(two["trainable"], one["trainable"]) < 1e-4
    for a, b in zip(two["history"], one["history"]):
        assert (a["clean_acc"], a["adv_acc"]) == (b["clean_acc"], b["adv_acc"])
