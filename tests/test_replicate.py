"""replicate.py through the CLIs on a tiny CLIP saved to a file: tables equal the JSONs, reruns reuse, ablation."""
import json
import os
import subprocess
import sys

import pytest
import torch

import nap
import synthetic
from clip.model import CLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "tiny.pt")
    torch.save(CLIP(*TINY).state_dict(), path)
    return path


def cli(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


def test_replication_on_a_reduced_budget(tiny_weights, tmp_path):
    """replicate.py through the CLIs: trains, evaluates, and its table holds exactly the numbers of the JSONs."""
    out = tmp_path / "rep"
    args = ["--arch", tiny_weights, "--out", str(out), "--methods", "zeroshot", "nap", "--eval-eps", "4/255",
            "--samples", "6", "--aa-samples", "3",
            "--train-args", "--shots 2 --epochs 1 --batch-size 8 --depth 2 --eps 4/255 --device cpu",
            "--eval-args", "--steps 2 --queries 5 --device cpu"]
    r = cli("replicate.py", *args)
    assert r.returncode == 0, r.stderr
    table = (out / "TABLE.md").read_text()
    pgd = json.loads((out / "eval" / "nap-pgd-4_255.json").read_text())
    aa = json.loads((out / "eval" / "nap-autoattack-4_255.json").read_text())
    assert set(pgd) == set(synthetic.TASKS) and set(aa) == {"synthetic"}
    assert all(row["n_samples"] == 6 and row["eps"] == 4 / 255 and row["steps"] == 2 for row in pgd.values())
    nap_row = next(line for line in table.splitlines() if line.startswith("| nap |")).split("|")[2:-1]
    first = [float(v) for v in nap_row[0].split("/")]
    assert first == [round(pgd["synthetic"]["clean"], 1), round(pgd["synthetic"]["robust"], 1),
                     round(aa["synthetic"]["robust"], 1)]
    clean_mean = sum(row["clean"] for row in pgd.values()) / len(pgd)
    assert float(nap_row[-1].split("/")[0]) == round(clean_mean, 1)
    assert "| advpt | - / - / - |" in table  # not run: shown as missing, not as zero
    sweep = json.loads((out / "eval" / "sweep-8_255.json").read_text())["synthetic"]
    assert sweep["eps"] == 8 / 255 and f"{sweep['robust']:.1f} |" in table.splitlines()[-1]
    r = cli("replicate.py", *args)  # everything is finished: nothing is trained or attacked again
    assert r.returncode == 0 and "$ python train.py" not in r.stdout and (out / "TABLE.md").read_text() == table


def test_ablation_trains_each_depth_with_and_without_refiners(tiny_weights, tmp_path):
    out = tmp_path / "rep"
    r = cli("replicate.py", "--arch", tiny_weights, "--out", str(out), "--ablation", "2", "--eval-eps", "4/255",
            "--samples", "4", "--train-args", "--shots 1 --epochs 1 --batch-size 8 --device cpu",
            "--eval-args", "--steps 1 --device cpu")
    assert r.returncode == 0, r.stderr
    for name, depth, refiners in [("depth1-none", 1, False), ("depth2-none", 2, False), ("depth2-both", 2, True)]:
        ckpt = nap.load_checkpoint(str(out / "ablation" / name / "checkpoint.pt"))
        assert ckpt["config"]["depth"] == depth
        assert any("refiner" in k for k in ckpt["trainable"]) == refiners
    rows = [line for line in (out / "ABLATION.md").read_text().splitlines() if line[:3].strip("| ").isdigit()]
    assert [row.split("|")[1:3] for row in rows] == [[" 1 ", " no "], [" 2 ", " no "], [" 2 ", " yes "]]
