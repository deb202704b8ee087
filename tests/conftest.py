"""Shared test setup: one torch thread for the whole suite, a tiny CLIP weights file, the CLIs as
subprocesses, and a training run stopped by Ctrl-C after its first checkpoint.

Every test runs tiny models, which are faster and steadier on one thread; on a busy 2-core
machine torch's two-thread pool made them up to 40x slower. torchrun workers in
test_distributed.py run with OMP_NUM_THREADS=1 too, so in-process references compute alike.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2)  # clip.model.CLIP's arguments: a 32-px ViT, 2 layers per tower


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny CLIP's state_dict saved to a file (seed 0): the backbone the CLI tests train and evaluate."""
    from clip.model import CLIP
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "tiny.pt")
    torch.save(CLIP(*TINY).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def varied_weights(tmp_path_factory):
    """The tiny CLIP without its image position and class embeddings: with them its random weights give every
    image the same class; without, its predictions (and so counts and per-image flags) depend on the pixels."""
    from clip.model import CLIP
    torch.manual_seed(0)
    model = CLIP(*TINY)
    with torch.no_grad():
        model.visual.positional_embedding.zero_()
        model.visual.class_embedding.zero_()
    path = str(tmp_path_factory.mktemp("weights") / "varied.pt")
    torch.save(model.state_dict(), path)
    return path


def cli(script, *args, cwd=ROOT):
    """Runs `python <script> args` from the project as a user would -> CompletedProcess (text output)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def stop_after_first_checkpoint(monkeypatch, argv):
    """train.main(argv) interrupted as by Ctrl-C right after its first epoch's checkpoint is written."""
    import train
    real = train.save

    def save_then_stop(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(train, "save", real)


def one_line_error(r, *fragments) -> str:
    """Asserts a CLI run ended with exit status 2 and one 'error: ...' line holding every fragment; -> that line."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip() and not line.startswith("warning")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
