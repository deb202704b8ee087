"""The README's commands as written: the offline ones run (on a tiny stand-in for the toy CLIP, with a
reduced budget appended, since later flags win), the ones that need OpenAI's weights and the real
datasets parse; torchrun's run on 2 CPU processes without --device. The library example runs as
written, on a tiny stand-in for ViT-B/16."""
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import clip
import evaluate
import toyclip
import train
from clip.model import CLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = {"train.py": ["--epochs", "1", "--shots", "2", "--depth", "2", "--workers", "0"],
          "evaluate.py": ["--n-samples", "8", "--steps", "2", "--queries", "10", "--batch-size", "8", "--workers", "0"]}
REAL = re.compile(r"imagenet|caltech|ViT-|RN50|--vision-weights")  # needs weights or data this machine lacks


def readme_commands() -> list:
    """The commands of the README's bash blocks, in order, without comments and line continuations."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split(" && "):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def script_and_args(cmd):
    """('train.py', args) for `python train.py ...` and `torchrun ... train.py ...`; None for others."""
    for i, word in enumerate(cmd):
        if word in ("train.py", "evaluate.py", "replicate.py"):
            return word, cmd[i + 1:]
    return None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working folder with the project's files linked in, and a cache whose toy CLIP is a tiny stand-in."""
    work, cache = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("cache")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "clip":
            os.symlink(os.path.join(ROOT, name), work / name)
    torch.manual_seed(0)
    torch.save(CLIP(32, 32, 2, 64, 8, 77, 49408, 64, 1, 2).state_dict(), cache / toyclip.ToyConfig().name())
    env = {**os.environ, "CLIP_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)}
    return work, env


def test_the_readme_has_the_commands_a_newcomer_runs():
    scripts = [s for s in map(script_and_args, readme_commands()) if s]
    offline = [s for s, args in scripts if not REAL.search(" ".join(args))]
    assert {"train.py", "evaluate.py", "replicate.py"} <= set(offline)
    assert any(c[0] == "torchrun" for c in readme_commands())


def test_real_protocol_commands_parse():
    """Commands that need OpenAI's weights or the datasets: every flag they use exists and parses."""
    for cmd in readme_commands():
        found = script_and_args(cmd)
        if found and REAL.search(" ".join(found[1])):
            {"train.py": train.parse_args, "evaluate.py": evaluate.parse_args}[found[0]](found[1])


def test_protocol_commands_parse():
    """protocols.py's commands: each parses as written (tests/test_protocols.py runs one on a reduced budget)."""
    import protocols
    found = [c[c.index("protocols.py") + 1:] for c in readme_commands() if "protocols.py" in c]
    assert {a[0] for a in found} == set(protocols.PROTOCOLS)
    for args in found:
        protocols.parse_args(args)


def test_offline_commands_run_as_written(sandbox):
    work, env = sandbox
    ran = 0
    for cmd in readme_commands():
        found = script_and_args(cmd)
        if not found or found[0] == "replicate.py" or REAL.search(" ".join(found[1])):
            continue  # replicate.py: tests/test_replicate.py runs it on a reduced budget
        if cmd[0] == "torchrun":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
            cmd = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", port,
                   *cmd[1:]]
        else:
            assert cmd[0] == "python", cmd
            cmd = [sys.executable, *cmd[1:]]
        r = subprocess.run(cmd + BUDGET[found[0]], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        ran += 1
    assert ran >= 4


def test_library_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python block on two pictures, with a 12-layer tiny CLIP (224 px, 32-px patches) as ViT-B/16."""
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    assert len(blocks) == 1
    torch.manual_seed(0)
    stand_in = str(tmp_path / "stand-in.pt")
    torch.save(CLIP(32, 224, 12, 64, 32, 77, 49408, 64, 1, 12).state_dict(), stand_in)
    real = clip.load
    monkeypatch.setattr(clip, "load", lambda name, **kw: real(stand_in if name == "ViT-B/16" else name, **kw))
    for name, colour in (("cat.jpg", (200, 120, 40)), ("dog.jpg", (40, 60, 90))):
        Image.new("RGB", (320, 240), colour).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(blocks[0], scope)
    images = scope["images"]
    assert images.shape == (2, 3, 224, 224) and 0 <= images.min() and images.max() <= 1
    assert scope["logits"].shape == (2, 4)
    for x in (scope["x_adv"], scope["x_aa"]):
        assert (x - images).abs().max() <= 1 / 255 + 1e-6 and 0 <= x.min() and x.max() <= 1
