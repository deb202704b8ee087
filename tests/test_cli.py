"""The command lines refuse a bad flag, a missing input or an unwritable output in one line (exit status 2)
before torch loads: each run here under `python -X importtime`, whose report names every module imported."""
import os
import subprocess
import sys

import pytest

import cmdline
import nap
import runtime
import train
from conftest import ROOT, one_line_error


def run_importing(script, *args, cwd):
    """`python -X importtime SCRIPT ARGS` -> (CompletedProcess with the import report taken out of stderr, the
    top-level names of the modules it imported)."""
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), *args], cwd=cwd,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    report = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    return r, {line.rsplit("|", 1)[1].strip().split(".")[0] for line in report}


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--epochs", "-1"], "--epochs and --max-steps must be >= 0"),
    ("train.py", ["--method", "coop"], "invalid choice: 'coop'"),
    ("train.py", ["--device", "gpu"], "'gpu' is not a device"),
    ("train.py", ["--dataset", "{tmp}/no/such/tree"], "no folder at"),
    ("train.py", ["--dataset", "caltech101", "--data-root", "{tmp}/nothing"], "--data-root"),
    ("train.py", ["--dataset", "caltech101", "--data-root", "{tmp}"], "caltech101: looked in"),
    ("train.py", ["--dataset", "Oxford-Pets", "--data-root", "{tmp}"], "oxford_pets: looked in"),
    ("evaluate.py", ["--dataset", "synthetic", "imagenet_sketch", "--data-root", "{tmp}"], "imagenet_sketch: looked in"),
    ("protocols.py", ["domain", "--arch", "ViT-B/16", "--data-root", "{tmp}"], "imagenet: looked in"),
    ("train.py", ["--arch", "{tmp}/missing.pt"], "not found"),
    ("train.py", ["--vision-weights", "{tmp}/missing.pt"], "--vision-weights"),
    ("train.py", ["--out", "{tmp}/a-file"], "is a file"),
    ("train.py", ["--out", "{tmp}/fresh", "--resume"], "no checkpoint"),
    ("replicate.py", ["--samples", "0"], "--samples must be >= 1"),
    ("replicate.py", ["--arch", "{tmp}/missing.pt"], "not found"),
    ("replicate.py", ["--out", "{tmp}/a-file"], "is a file"),
    ("toyclip.py", ["--device", "gpu"], "'gpu' is not a device"),
    ("toyclip.py", ["--download-root", "{tmp}/a-file"], "is a file"),
    ("figures.py", ["{tmp}/no-results"], "does not exist"),
])
def test_bad_input_is_refused_before_torch_loads(script, args, message, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r, imported = run_importing(script, *[a.format(tmp=tmp_path) for a in args], cwd=str(tmp_path))
    one_line_error(r, message)
    assert "cmdline" in imported and "argparse" in imported  # the report is there ...
    assert "torch" not in imported and "matplotlib" not in imported  # ... and names neither


def test_a_flag_whose_names_live_in_nap_reads_them_from_there(tmp_path):
    """--coupling/--refine/--refiner-init take nap.py's names, read (with torch) only when the flag is given."""
    r, imported = run_importing("train.py", "--refine", "all", cwd=str(tmp_path))
    one_line_error(r, "invalid choice: 'all' (choose from 'none', 'vision', 'text', 'both')")
    assert "torch" in imported


def test_the_names_checked_before_torch_are_the_modules_own():
    assert set(train.METHODS) == set(nap.PRESETS)
    assert cmdline.PRECISIONS == tuple(runtime.DTYPES)


def test_cmdline_and_recipes_load_no_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import cmdline, recipes"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "torch" not in r.stderr and "cmdline" in r.stderr
