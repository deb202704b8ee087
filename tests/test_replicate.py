"""replicate.py through the CLIs on a tiny CLIP saved to a file: tables equal the JSONs, reruns reuse and a
changed command retrains, controls and fine-tuned encoders join the tables; the runs of the ablation and the
transfer investigation build the intended models; figures.py draws from fake results, one colour per method."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

import figures
import nap
import replicate
import runtime
import synthetic
import train
from clip.model import CLIP

from conftest import ROOT, TINY  # the tiny CLIP has 2 layers: NAP's preset depth 9 of 12 scales to 2
TRAIN = "--shots 1 --epochs 1 --batch-size 8 --device cpu"
EVAL = "--steps 2 --queries 5 --device cpu"


def replicate_cli(weights, out, *args, train_args=TRAIN):
    """python replicate.py on the tiny CLIP, 4/255, 6 PGD / 3 AutoAttack images, one thread per subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "replicate.py"), "--arch", weights, "--out", str(out),
                           "--eval-eps", "4/255", "--samples", "6", "--aa-samples", "3", "--train-args", train_args,
                           "--eval-args", EVAL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def results_of(out, name: str, attack: str, n: int) -> dict:
    """evaluate.py's results of a run at 4/255 as replicate.py stores them."""
    return json.loads(open(replicate.eval_path(str(out), name, attack, "4/255", n, EVAL.split())).read())


def section(table: str, title: str) -> list:
    """The rows of the markdown table under the line starting with title: [[cell, ...], ...]."""
    lines = table[table.index(title):].split("\n\n")[1].splitlines()[2:]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines]


def row(rows: list, name: str) -> list:
    return next(r for r in rows if r[0] == name)


def pair(result: dict) -> str:
    return f"{result['clean']:.1f} / {result['robust']:.1f}"


def trained_parameters(path) -> int:
    return sum(t.numel() for t in nap.load_checkpoint(str(path))["trainable"].values())


def test_tables_equal_the_results_and_reruns_reuse_until_the_command_changes(tiny_weights, tmp_path):
    out = tmp_path / "rep"
    r = replicate_cli(tiny_weights, out, "--methods", "nap", "--sweep-eps", "0", "2/255", "4/255", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    table = (out / "TABLE.md").read_text()
    pgd, aa = results_of(out, "nap", "pgd", 6), results_of(out, "nap", "autoattack", 3)
    sweep = json.loads(open(replicate.eval_path(str(out), "nap", "pgd", "2/255", 6, EVAL.split())).read())
    assert set(pgd) == set(synthetic.TASKS) and set(aa) == set(sweep) == {"synthetic"}
    assert all(v["n_samples"] == 6 and v["eps"] == 4 / 255 and v["steps"] == 2 for v in pgd.values())
    assert aa["synthetic"]["n_samples"] == 3 and sweep["synthetic"]["eps"] == 2 / 255

    rows = section(table, "Comparison at eps 4/255")
    assert [r[0] for r in rows] == ["nap"]  # only the runs asked for
    params = trained_parameters(out / "nap" / "checkpoint.pt")
    assert params > 0
    means = [sum(v[k] for v in pgd.values()) / len(pgd) for k in ("clean", "robust")]
    assert row(rows, "nap") == ["nap", f"{params:,}", pair(pgd["synthetic"]), pair(aa["synthetic"]),
                                *[pair(pgd[t]) for t in list(synthetic.TASKS)[1:]], f"{means[0]:.1f} / {means[1]:.1f}"]
    sweep_row = row(section(table, "Robust accuracy (%) vs eps"), "nap")
    assert sweep_row[1:] == [f"{pgd['synthetic']['clean']:.1f}", f"{sweep['synthetic']['robust']:.1f}",
                             f"{pgd['synthetic']['robust']:.1f}"]  # eps 0 is the clean accuracy of the same images
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["nap"]["params"] == params and results["sweep"]["nap"]["2/255"] == sweep["synthetic"]["robust"]
    assert "Wall time:" in table and results["wall_time_s"] >= 0
    assert (out / "eps-sweep.png").stat().st_size > 10_000 and not (out / "frozen-vs-finetuned.png").exists()

    evals = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("nap-*.json")}
    r = replicate_cli(tiny_weights, out, "--methods", "nap", "--sweep-eps", "4/255", "--aa-samples", "0", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    assert "$ python train.py" not in r.stdout and "nap: reusing the finished run" in r.stdout
    assert "reusing the finished result" in r.stdout  # evaluate.py attacked nothing
    assert {p: p.stat().st_mtime_ns for p in evals} == evals
    again = row(section((out / "TABLE.md").read_text(), "Comparison at eps 4/255"), "nap")
    assert again[:3] + again[4:] == row(rows, "nap")[:3] + row(rows, "nap")[4:] and again[3] == "- / -"  # no AA asked

    r = replicate_cli(tiny_weights, out, "--methods", "nap", "--sweep-eps", "4/255", "--aa-samples", "0", "--jobs", "1",
                      train_args=TRAIN + " --epochs 2")
    assert r.returncode == 0, r.stderr
    assert "nap: " in r.stdout and "holds another run" in r.stdout and "$ python train.py" in r.stdout
    assert len(nap.load_checkpoint(str(out / "nap" / "checkpoint.pt"))["history"]) == 2
    assert "recomputing" in r.stdout
    assert json.loads((out / "nap" / "replicate.json").read_text())["key"]["command"][-2:] == ["--epochs", "2"]


def test_controls_and_fine_tuned_encoders_join_the_tables_and_the_ablation_reuses_them(tiny_weights, tmp_path):
    out = tmp_path / "rep"
    r = replicate_cli(tiny_weights, out, "--methods", "zeroshot", "fare", "--controls", "--ablation", "2",
                      "--aa-samples", "0", "--sweep-eps", "4/255", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    table = (out / "TABLE.md").read_text()
    rows = section(table, "Comparison at eps 4/255")
    assert [r[0] for r in rows] == ["zeroshot", "fare", "advmaple@nap", "nap@baselines"]
    visual = sum(p.numel() for p in CLIP(*TINY).visual.parameters())
    assert row(rows, "zeroshot")[1] == "0" and row(rows, "fare")[1] == f"{visual:,}"  # FARE trains the image encoder
    for name in ("advmaple@nap", "nap@baselines"):
        assert row(rows, name)[1] == f"{trained_parameters(out / name / 'checkpoint.pt'):,}"
        pgd = results_of(out, name, "pgd", 6)
        assert row(rows, name)[2] == pair(pgd["synthetic"]) and row(rows, name)[3] == "- / -"  # no AutoAttack asked
    recorded = lambda name: nap.load_checkpoint(str(out / name / "checkpoint.pt"))["args"]
    assert (recorded("advmaple@nap")["recipe"], recorded("advmaple@nap")["loss"]) == ("nap", "curriculum")
    assert (recorded("nap@baselines")["recipe"], recorded("nap@baselines")["loss"]) == ("baselines", "half")
    assert (out / "logs" / "fare-train.log").exists() and "finished fare-train" in r.stdout  # --jobs 2 logs each job

    abl = section(table, "NAP on synthetic by prompt depth J")
    assert [r[:3] for r in abl] == [["1", "no", "nap-depth1"], ["2", "no", "advmaple@nap"], ["2", "yes", "nap"]]
    assert nap.load_checkpoint(str(out / "nap-depth1" / "checkpoint.pt"))["config"]["depth"] == 1
    nap_pgd = results_of(out, "nap", "pgd", 6)
    assert abl[2][3] == pair(nap_pgd["synthetic"]) and r.stdout.count("--out " + str(out / "nap") + " ") == 1
    assert r.stdout.count("--out " + replicate.eval_path(str(out), "advmaple@nap", "pgd", "4/255", 6, EVAL.split())) == 1
    assert (out / "depth-refiners.png").exists() and (out / "frozen-vs-finetuned.png").exists()


def test_ablation_and_transfer_runs_build_the_intended_models(tiny_weights):
    """Each variant's train.py flags give the model it claims, with NAP's recipe; shared runs share one name."""
    backbone = runtime.load_backbone(tiny_weights, torch.device("cpu"))
    build = lambda flags: train.build_model(train.parse_args(["--arch", tiny_weights, *flags]), backbone, ["a", "b"])
    rows = {r["run"]: r for r in replicate.transfer_rows(nap_depth=2, n_ctx=2)}
    assert list(rows)[:2] == ["zeroshot", "nap"] and rows["zeroshot"]["flags"] is None
    want = {"nap": (2, 2, 2, "both"), "advmaple@nap": (2, 2, 2, "none"), "nap-refine-vision": (2, 2, 2, "vision"),
            "nap-refine-text": (2, 2, 2, "text"), "nap-text-only": (2, 0, 2, "none"), "nap-vision-only": (0, 2, 2, "none"),
            "nap-depth1": (2, 2, 1, "none")}
    assert set(rows) - {"zeroshot"} == set(want)
    for name, (text_ctx, vision_ctx, depth, refine) in want.items():
        flags = rows[name]["flags"]
        assert train.parse_args(["--arch", tiny_weights, *flags]).loss == "curriculum", name  # NAP's recipe
        cfg = build(flags).cfg
        assert (cfg.text_ctx, cfg.vision_ctx, cfg.depth, cfg.refine) == (text_ctx, vision_ctx, depth, refine), name
    ablation = replicate.ablation_rows(layers=4, nap_depth=3)
    assert [(r["depth"], r["refiners"], r["run"]) for r in ablation] == [
        (1, False, "nap-depth1"), (2, False, "nap-depth2-norefine"), (2, True, "nap-depth2"), (3, False, "advmaple@nap"),
        (3, True, "nap"), (4, False, "nap-depth4-norefine"), (4, True, "nap-depth4")]
    shared = {r["run"]: r["flags"] for r in replicate.transfer_rows(nap_depth=3, n_ctx=2)}
    assert all(shared[r["run"]] == r["flags"] for r in ablation if r["run"] in shared)  # one run, one command
    assert {"nap-depth1", "nap-depth2"} <= set(shared)


def fake_results() -> dict:
    """Results as replicate.collect writes them, with made-up numbers: every part, every run."""
    rng = np.random.default_rng(0)
    tasks, eval_eps = list(synthetic.TASKS), ["1/255", "4/255"]
    ablation = replicate.ablation_rows(4, 3)
    transfer = replicate.transfer_rows(3, 2)
    comparison = replicate.METHODS + list(replicate.CONTROLS)
    names = list(dict.fromkeys(comparison + [r["run"] for r in ablation + transfer]))
    cell = lambda: {"clean": float(rng.uniform(40, 95)), "robust": float(rng.uniform(0, 40)), "n_samples": 200, "steps": 100}
    runs = {n: {"params": 1000 * i, "pgd": {e: {t: cell() for t in tasks} for e in eval_eps + ["0.5/255", "2/255"]},
                "autoattack": {e: {"synthetic": cell()} for e in eval_eps}} for i, n in enumerate(names)}
    sweep = {n: {e: runs[n]["pgd"]["1/255"]["synthetic"]["clean" if e == "0" else "robust"] if e in ("0", "1/255")
                 else runs[n]["pgd"][e]["synthetic"]["robust"] for e in replicate.SWEEP} for n in comparison}
    return {"arch": "toy", "training_task": "synthetic", "tasks": tasks, "eval_eps": eval_eps, "sweep_eps": replicate.SWEEP,
            "samples": 200, "aa_samples": 50, "steps": 100, "comparison": comparison, "controls": list(replicate.CONTROLS),
            "runs": runs, "sweep": sweep, "ablation": [{k: r[k] for k in ("depth", "refiners", "run")} for r in ablation],
            "transfer": [{k: r[k] for k in ("variant", "run")} for r in transfer]}


def pixels_of(png, colour: str) -> int:
    """How many pixels of the PNG have exactly this colour ('#rrggbb')."""
    import matplotlib.image
    rgb = np.round(matplotlib.image.imread(str(png))[..., :3] * 255).astype(int)
    target = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((rgb == target).all(-1).sum())


def test_figures_from_fake_results_keep_one_colour_per_method(tmp_path, monkeypatch):
    drawn = {}
    save = figures.save

    def capture(fig, path):
        drawn[os.path.basename(path)] = {
            "labels": [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()],
            "axes": [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]}
        return save(fig, path)

    monkeypatch.setattr(figures, "save", capture)
    results = fake_results()
    paths = figures.write_all(results, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == list(figures.FILES)
    for p in paths:
        assert os.path.getsize(p) > 20_000
    assert drawn["eps-sweep.png"]["axes"] == [("eps (/255)", "robust accuracy (%)")]
    assert drawn["eps-sweep.png"]["labels"] == results["comparison"]
    assert all(y.endswith("accuracy (%)") or "accuracy (%)," in y for f in drawn.values() for _, y in f["axes"])
    assert f"tecoa ({results['runs']['tecoa']['params']:,} trained parameters)" in drawn["frozen-vs-finetuned.png"]["labels"]
    # each method is drawn in its colour wherever it appears, and its colour appears nowhere else
    where = {"nap": set(figures.FILES), "tecoa": {"eps-sweep.png", "frozen-vs-finetuned.png"},
             "advmaple": {"eps-sweep.png", "depth-refiners.png", "transfer.png"},  # NAP without refiners
             "advvlp": {"eps-sweep.png"}}
    for method, files in where.items():
        for name in figures.FILES:
            n = pixels_of(tmp_path / name, figures.COLOURS[method])
            assert (n > 50) == (name in files), (method, name, n)
    assert figures.colour("advmaple@nap") == figures.COLOURS["advmaple"] and figures.other_recipe("advmaple@nap")
    (tmp_path / "part").mkdir()  # a figure is drawn only when its part ran
    partial = {**results, "ablation": [], "transfer": [], "sweep": {}}
    assert figures.write_all(partial, str(tmp_path / "part")) == [str(tmp_path / "part" / "frozen-vs-finetuned.png")]
