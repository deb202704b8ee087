"""protocols.py: what each protocol trains and scores, its tables recomputed here from the evaluation files
(base-to-new's harmonic means as CoCoOp reports them), and the base-to-new and transfer protocols end to end on
a tiny CLIP."""
import json
import os
import subprocess
import sys

import pytest

import data
import nap
import protocols
import synthetic

from conftest import ROOT
TRAIN = "--epochs 1 --batch-size 8 --device cpu"
EVAL = "--steps 2 --device cpu"


def args_of(*argv):
    return protocols.parse_args(list(argv))


def test_each_protocol_trains_and_scores_what_it_says():
    a = args_of("base-to-new", "--methods", "zeroshot", "nap")
    plan = protocols.jobs(a, None)
    assert a.datasets == ["synthetic", "synthetic-colour", "synthetic-texture", "synthetic-position"]
    assert [tests for t, tests in plan if t is None] == [[(d, "base"), (d, "new")] for d in a.datasets]
    assert [(t["dataset"], t["classes"], t["shots"]) for t, _ in plan if t] == [(d, "base", None) for d in a.datasets]
    assert all(tests == [(t["dataset"], "base"), (t["dataset"], "new")] for t, tests in plan if t)

    a = args_of("few-shot", "--methods", "zeroshot", "advmaple", "--shots", "1", "4", "--datasets", "synthetic")
    plan = protocols.jobs(a, None)
    assert plan[0] == (None, [("synthetic", "all")])
    assert [(t["shots"], tests) for t, tests in plan[1:]] == [(1, [("synthetic", "all")]), (4, [("synthetic", "all")])]

    a = args_of("domain", "--methods", "nap")
    (training, tests), = protocols.jobs(a, None)
    assert training == {"method": "nap", "recipe": "nap", "dataset": "synthetic", "shots": None, "classes": "all"}
    assert [d for d, _ in tests] == ["synthetic", *synthetic.DOMAINS]
    real = args_of("domain", "--arch", "ViT-B/16")
    assert real.datasets == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert real.samples == 0 and args_of("domain").samples == 200
    assert args_of("base-to-new", "--arch", "ViT-B/16").datasets == protocols.COOP11
    assert set(protocols.COOP11) <= set(data.DATASETS) and set(synthetic.DOMAINS) <= set(protocols.DATASETS["domain"][1])

    a = args_of("cross-dataset", "--methods", "nap")
    (training, tests), = protocols.jobs(a, list(synthetic.TASKS))
    assert training["dataset"] == "synthetic" and [d for d, _ in tests] == list(synthetic.TASKS)


def test_recipe_own_or_one_family_for_every_method():
    own = args_of("domain", "--methods", "zeroshot", "advmaple", "nap")
    controlled = args_of("domain", "--methods", "zeroshot", "advmaple", "nap", "--recipe", "nap")
    for a, names, flags in [(own, ["advmaple@baselines-synthetic", "nap@nap-synthetic"], [[], []]),
                            (controlled, ["advmaple@nap-synthetic", "nap@nap-synthetic"], [["--recipe", "nap"], []])]:
        plan = protocols.jobs(a, None)
        assert plan[0][0] is None  # zero-shot CLIP trains nothing, whatever the recipe
        trainings = [t for t, _ in plan if t]
        assert [protocols.run_name(t) for t in trainings] == names
        commands = [protocols.train_command(t, "out", 1, a) for t in trainings]
        assert [c[c.index("--recipe"):c.index("--recipe") + 2] if "--recipe" in c else [] for c in commands] == flags
    nap_baselines = protocols.jobs(args_of("domain", "--methods", "nap", "--recipe", "baselines"), None)[0][0]
    assert protocols.run_name(nap_baselines) == "nap@baselines-synthetic"
    assert "--recipe baselines" in " ".join(protocols.train_command(nap_baselines, "out", 1, own))
    assert protocols.table_folder(own) == os.path.join("runs", "protocols", "domain")
    assert protocols.table_folder(controlled) == os.path.join("runs", "protocols", "domain-recipe-nap")
    assert protocols.table_folder(args_of("domain", "--attack", "cw", "--eps", "4/255")).endswith("domain-cw-eps4_255")
    assert "with the nap recipe" in protocols.table(controlled, {}, [])
    assert "its own source's recipe" in protocols.table(own, {}, [])


@pytest.mark.parametrize("argv,fragment", [
    (["base-to-new", "--seeds", "0"], "--seeds must be >= 1"),
    (["few-shot", "--shots", "0"], "--shots must be >= 1"),
    (["domain", "--datasets", "synthetic"], "at least two"),
    (["domain", "--eps", "one"], "--eps"),
    (["other"], "invalid choice"),
    (["domain", "--recipe", "tecoa"], "invalid choice"),
    (["domain", "--eps", "8"], "did you mean 8/255"),
    (["domain", "--arch", "ViT-B/16", "--data-root", "/nonexistent/data"], "no such folder"),
])
def test_bad_arguments_are_one_line_before_torch(argv, fragment):
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "protocols.py"), *argv], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr[-500:]
    assert not any(ln.split("|")[-1].strip() == "torch" for ln in r.stderr.splitlines() if ln.startswith("import time:"))


def fake_results(a, plan, values):
    """Writes evaluate.py-like JSONs: values[(row, dataset, classes)] = [(clean, robust) per seed]."""
    for training, tests in plan:
        row = training["method"] if training else "zeroshot"
        row = (row, training["shots"]) if training and training["shots"] else row
        for i, seed in enumerate([None] if training is None else a.seed_list):
            for dataset, classes in tests:
                clean, robust = values[(row, dataset, classes)][i]
                path = protocols.eval_file(a, protocols.run_name(training), seed, dataset, classes)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                json.dump({dataset: {"clean": clean, "robust": robust}}, open(path, "w"))


def hm(a, b):
    return 2 * a * b / (a + b)


def test_base_to_new_table_recomputed(tmp_path):
    a = args_of("base-to-new", "--methods", "zeroshot", "nap", "--datasets", "synthetic", "synthetic-colour",
                "--seeds", "2", "--out", str(tmp_path))
    plan = protocols.jobs(a, None)
    values = {("zeroshot", "synthetic", "base"): [(80.0, 10.0)], ("zeroshot", "synthetic", "new"): [(60.0, 0.0)],
              ("zeroshot", "synthetic-colour", "base"): [(90.0, 30.0)], ("zeroshot", "synthetic-colour", "new"): [(70.0, 20.0)],
              ("nap", "synthetic", "base"): [(70.0, 40.0), (72.0, 44.0)], ("nap", "synthetic", "new"): [(50.0, 20.0), (54.0, 22.0)],
              ("nap", "synthetic-colour", "base"): [(60.0, 30.0), (64.0, 34.0)],
              ("nap", "synthetic-colour", "new"): [(40.0, 10.0), (44.0, 12.0)]}
    fake_results(a, plan, values)
    rows = protocols.cells(a, plan)
    columns = protocols.averaged(a, rows)
    assert columns == ["synthetic base", "synthetic new", "synthetic HM", "synthetic-colour base", "synthetic-colour new",
                       "synthetic-colour HM", "average base", "average new", "average HM"]
    table = protocols.table(a, rows, columns)
    zs = next(ln for ln in table.splitlines() if ln.startswith("| zeroshot"))
    cells = [c.strip() for c in zs.split("|")[1:-1]]
    assert cells[3] == f"{hm(80, 60):.1f} / 0.0"  # HM of 10 and 0 is 0
    # the average HM is the harmonic mean of the averages (CoCoOp), not the mean of the HMs
    assert cells[-1] == f"{hm(85, 65):.1f} / {hm(20, 10):.1f}" and cells[-3] == "85.0 / 20.0"
    nap_row = [c.strip() for c in next(ln for ln in table.splitlines() if ln.startswith("| nap")).split("|")[1:-1]]
    seeds_hm = [hm(70, 50), hm(72, 54)]
    mean = sum(seeds_hm) / 2
    std = (sum((v - mean) ** 2 for v in seeds_hm) / 1) ** 0.5  # sample std over seeds
    assert nap_row[3].startswith(f"{mean:.1f} ± {std:.1f} / ")
    assert nap_row[8] == "47.0 ± 2.8 / 16.0 ± 1.4"  # average new per seed: (50+40)/2=45 / 15, (54+44)/2=49 / 17
    assert "mean ± std over 2 seeds" in table


def test_few_shot_table_one_row_per_method_and_shot_count(tmp_path):
    a = args_of("few-shot", "--methods", "zeroshot", "nap", "--shots", "1", "4", "--datasets", "synthetic",
                "synthetic-colour", "--out", str(tmp_path))
    plan = protocols.jobs(a, None)
    values = {("zeroshot", "synthetic", "all"): [(70.0, 20.0)], ("zeroshot", "synthetic-colour", "all"): [(90.0, 80.0)],
              (("nap", 1), "synthetic", "all"): [(30.0, 10.0)], (("nap", 1), "synthetic-colour", "all"): [(50.0, 30.0)],
              (("nap", 4), "synthetic", "all"): [(40.0, 14.0)], (("nap", 4), "synthetic-colour", "all"): [(60.0, 36.0)]}
    fake_results(a, plan, values)
    rows = protocols.cells(a, plan)
    assert list(rows) == ["zeroshot", "nap, 1 shot", "nap, 4 shots"]
    assert protocols.averaged(a, rows) == ["synthetic", "synthetic-colour", "average"]
    assert [protocols.cell(rows[r]["average"]) for r in rows] == ["80.0 / 50.0", "40.0 / 20.0", "50.0 / 25.0"]


def test_domain_average_leaves_the_source_out(tmp_path):
    a = args_of("domain", "--methods", "nap", "--out", str(tmp_path))
    plan = protocols.jobs(a, None)
    datasets = [d for d, _ in plan[0][1]]
    values = {("nap", d, "all"): [(10.0 * (i + 1), float(i))] for i, d in enumerate(datasets)}
    fake_results(a, plan, values)
    rows = protocols.cells(a, plan)
    columns = protocols.averaged(a, rows)
    assert columns == [*datasets, "target average"]
    targets = [10.0 * (i + 1) for i in range(1, len(datasets))]
    assert protocols.cell(rows["nap"]["target average"]).startswith(f"{sum(targets) / len(targets):.1f} / ")


def test_base_to_new_end_to_end_on_a_tiny_clip(tiny_weights, tmp_path):
    out = tmp_path / "p"
    cmd = [sys.executable, os.path.join(ROOT, "protocols.py"), "base-to-new", "--arch", tiny_weights,
           "--methods", "zeroshot", "advpt", "--datasets", "synthetic-texture", "--samples", "6", "--jobs", "1",
           "--out", str(out), "--train-args", TRAIN, "--eval-args", EVAL]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = nap.load_checkpoint(str(out / "runs" / "advpt@baselines-synthetic-texture-base" / "seed1" / "checkpoint.pt"))
    assert ckpt["classnames"] == synthetic.TEXTURES[:2]  # trained on the base classes only
    results = json.loads((out / "base-to-new" / "results.json").read_text())
    for classes, names in (("base", synthetic.TEXTURES[:2]), ("new", synthetic.TEXTURES[2:])):
        path = protocols.eval_file(protocols.parse_args(cmd[2:]), "advpt@baselines-synthetic-texture-base", 1,
                                   "synthetic-texture", classes)
        r_json = json.loads(open(path).read())["synthetic-texture"]
        assert r_json["n_samples"] == 6
        assert results["rows"]["advpt"][f"synthetic-texture {classes}"]["clean"] == [r_json["clean"]]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert again.returncode == 0 and "reusing the finished run" in again.stdout
