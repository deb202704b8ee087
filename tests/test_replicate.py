"""replicate.py through the CLIs on a tiny CLIP saved to a file: tables equal the JSONs, reruns reuse and a
changed command retrains, controls and fine-tuned encoders join the tables; the runs of the ablation and the
transfer investigation build the intended models; figures.py draws from fake results, one colour and marker per
method, every series of a figure told apart in it and its legend, legible at the README's width."""
import json
import math
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
                           "--eval-eps", "4/255", "--samples", "6", "--train-args", train_args,
                           "--eval-args", EVAL, *args], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def results_of(out, name: str, seed, attack: str, n: int, eps="4/255") -> dict:
    """evaluate.py's results of one run and seed as replicate.py stores them."""
    return json.loads(open(replicate.eval_path(str(out), name, seed, attack, eps, n, EVAL.split())).read())


def section(table: str, title: str) -> list:
    """The rows of the markdown table under the line starting with title: [[cell, ...], ...]."""
    lines = table[table.index(title):].split("\n\n")[1].splitlines()[2:]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines]


def row(rows: list, *names) -> list:
    return next(r for r in rows if r[:len(names)] == list(names))


def wilson_cell(percent: float, n: int) -> str:
    """'50.0 [25.4, 74.6]': the accuracy and its 95% Wilson interval, computed here from the textbook formula."""
    p, z = percent / 100, 1.959963984540054
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{percent:.1f} [{100 * (centre - half):.1f}, {100 * (centre + half):.1f}]"


def trained_parameters(path) -> int:
    return sum(t.numel() for t in nap.load_checkpoint(str(path))["trainable"].values())


def test_tables_equal_the_results_and_reruns_reuse_until_the_command_changes(tiny_weights, tmp_path):
    out = tmp_path / "rep"
    r = replicate_cli(tiny_weights, out, "--methods", "nap", "--recipes", "nap", "--sweep-eps", "0", "2/255", "4/255",
                      "--ablation", "2", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    table = (out / "TABLE.md").read_text()
    pgd, aa = results_of(out, "nap@nap", 1, "pgd", 6), results_of(out, "nap@nap", 1, "autoattack", 6)
    sweep = results_of(out, "nap@nap", 1, "pgd", 6, eps="2/255")
    assert set(pgd) == set(synthetic.TASKS) and set(aa) == set(sweep) == {"synthetic"}
    assert all(v["n_samples"] == 6 and v["eps"] == 4 / 255 and v["steps"] == 2 for v in pgd.values())
    assert aa["synthetic"]["n_samples"] == 6 and sweep["synthetic"]["eps"] == 2 / 255
    assert aa["synthetic"]["images"]["evaluated"] == pgd["synthetic"]["images"]["evaluated"]  # the same images

    rows = section(table, "Controlled comparison at eps 4/255")
    assert [r[:2] for r in rows] == [["nap", "nap (own)"], ["nap-norefine", "nap"]]  # only the runs asked for
    params = trained_parameters(out / "nap@nap" / "seed1" / "checkpoint.pt")
    assert params > 0 and row(rows, "nap")[2] == f"{params:,}"
    s = pgd["synthetic"]
    transfer = [pgd[t] for t in list(synthetic.TASKS)[1:]]
    means = [sum(v[k] for v in transfer) / len(transfer) for k in ("clean", "robust")]
    assert row(rows, "nap")[3:] == [wilson_cell(s["clean"], 6), wilson_cell(s["robust"], 6),
                                    wilson_cell(aa["synthetic"]["robust"], 6), f"{means[0]:.1f} / {means[1]:.1f}"]
    sweep_row = row(section(table, "Robust accuracy (%) vs eps"), "nap@nap")
    assert sweep_row[1:] == [f"{s['clean']:.1f}", f"{sweep['synthetic']['robust']:.1f}", f"{s['robust']:.1f}"]
    paired = row(section(table, "Paired comparisons"), "TokenRefiners, nap recipe", "nap@nap", "nap-norefine@nap", "PGD")
    other = results_of(out, "nap-norefine@nap", 1, "pgd", 6)["synthetic"]
    assert paired[4] == f"{s['robust'] - other['robust']:+.1f}"
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["nap@nap"]["params"] == params
    assert results["sweep"]["nap@nap"]["2/255"] == sweep["synthetic"]["robust"]
    assert "Wall time:" in table and results["wall_time_s"] >= 0 and "[2/2]" in r.stdout  # progress: job k of n
    assert f"written: {out / 'TABLE.md'}" in r.stdout
    assert (out / "eps-sweep.png").stat().st_size > 10_000 and not (out / "frozen-vs-finetuned.png").exists()
    abl = section(table, "NAP on synthetic by prompt depth J")
    assert [r[:3] for r in abl] == [["1", "no", "nap-depth1-norefine@nap"], ["2", "no", "nap-norefine@nap"],
                                    ["2", "yes", "nap@nap"]]
    assert nap.load_checkpoint(str(out / "nap-depth1-norefine@nap" / "seed1" / "checkpoint.pt"))["config"]["depth"] == 1

    evals = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("nap@nap-*.json")}
    r = replicate_cli(tiny_weights, out, "--methods", "nap", "--recipes", "nap", "--sweep-eps", "4/255",
                      "--aa-samples", "0", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    assert "$ python train.py" not in r.stdout and "nap@nap seed 1: reusing the finished run" in r.stdout
    assert "reusing the finished result" in (out / "logs" / "nap@nap-seed1-pgd-4_255.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in evals} == evals  # evaluate.py attacked nothing
    again = row(section((out / "TABLE.md").read_text(), "Controlled comparison at eps 4/255"), "nap")
    assert again[:5] == row(rows, "nap")[:5] and again[5] == "-"  # no AutoAttack asked

    r = replicate_cli(tiny_weights, out, "--methods", "nap", "--recipes", "nap", "--sweep-eps", "4/255",
                      "--aa-samples", "0", "--jobs", "1", train_args=TRAIN + " --epochs 2")
    assert r.returncode == 0, r.stderr
    assert "holds another run" in r.stdout and "$ python train.py" in r.stdout
    assert len(nap.load_checkpoint(str(out / "nap@nap" / "seed1" / "checkpoint.pt"))["history"]) == 2
    assert "recomputing" in (out / "logs" / "nap@nap-seed1-pgd-4_255.log").read_text()


def test_seeds_give_mean_and_std_and_every_recipe_family_is_trained(tiny_weights, tmp_path):
    out = tmp_path / "rep"
    r = replicate_cli(tiny_weights, out, "--methods", "zeroshot", "advmaple", "fare", "--seeds", "2",
                      "--aa-samples", "0", "--sweep-eps", "4/255", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    rows = section((out / "TABLE.md").read_text(), "Controlled comparison at eps 4/255")
    assert [r[:2] for r in rows] == [["zeroshot", "-"], ["advmaple", "baselines (own)"], ["advmaple", "nap"],
                                     ["fare", "fare (own)"]]
    visual = sum(p.numel() for p in CLIP(*TINY).visual.parameters())
    assert row(rows, "zeroshot")[2] == "0" and row(rows, "fare")[2] == f"{visual:,}"  # FARE trains the image encoder
    for name, family, loss in (("advmaple@baselines", "baselines", "half"), ("advmaple@nap", "nap", "curriculum")):
        for seed in (1, 2):
            recorded = nap.load_checkpoint(str(out / name / f"seed{seed}" / "checkpoint.pt"))["args"]
            assert (recorded["recipe"], recorded["loss"], recorded["seed"]) == (family, loss, seed)
        values = [results_of(out, name, seed, "pgd", 6)["synthetic"]["clean"] for seed in (1, 2)]
        mean, std = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)  # sample std of two values
        assert row(rows, "advmaple", family if family == "nap" else "baselines (own)")[3] == f"{mean:.1f} ± {std:.1f}"
    zs = results_of(out, "zeroshot", None, "pgd", 6)["synthetic"]
    assert row(rows, "zeroshot")[3] == wilson_cell(zs["clean"], 6)  # one result: its interval
    assert (out / "logs" / "fare-seed2-train.log").exists() and "finished fare-seed2-train" in r.stdout
    assert (out / "frozen-vs-finetuned.png").exists() is False  # nap was not asked for


def test_every_run_name_builds_the_model_and_recipe_it_claims(tiny_weights):
    """Comparison, ablation and transfer runs: each name's train.py flags give the model and recipe it claims."""
    backbone = runtime.load_backbone(tiny_weights, torch.device("cpu"))
    parse = lambda name: train.parse_args(["--arch", tiny_weights, *replicate.run_flags(name)])
    build = lambda name: train.build_model(parse(name), backbone, ["a", "b"]).cfg
    runs = replicate.comparison_runs(replicate.METHODS, replicate.FAMILIES)
    assert runs == ["zeroshot", *[f"{m}@{f}" for m in replicate.PROMPT_METHODS + ["nap-norefine"]
                                  for f in ("baselines", "nap")], "tecoa", "fare"]
    assert replicate.run_flags("zeroshot") is None
    for name in runs[1:-2]:
        model, family = name.split("@")
        args = parse(name)
        assert (args.recipe, args.loss) == (family, {"baselines": "half", "nap": "curriculum"}[family]), name
        cfg = build(name)
        assert cfg.method == model.replace("-norefine", "")
        assert cfg.refine == ("vision" if model == "nap" else "none"), name
    assert (parse("tecoa").loss, parse("fare").loss) == ("adv", "fare")
    want = {"nap@nap": ("vision", "default", 2), "nap-norefine@nap": ("none", "default", 2),
            "nap-zeroinit@nap": ("vision", "zero", 2), "nap-both@baselines": ("both", "default", 2),
            "nap-text@nap": ("text", "default", 2), "nap-depth1-norefine@nap": ("none", "default", 1)}
    for name, (refine, init, depth) in want.items():
        cfg = build(name)
        assert (cfg.refine, cfg.refiner_init, cfg.depth, cfg.text_ctx) == (refine, init, depth, 16), name
    transfer = [r["run"] for r in replicate.transfer_rows()]
    assert {"nap@nap", "nap-norefine@nap", "nap-zeroinit@nap", "nap-both@nap", "nap-both@baselines", "nap-text@nap",
            "nap-text@baselines", "advmaple@nap", "advmaple@baselines"} <= set(transfer)
    ablation = replicate.ablation_rows(layers=4, nap_depth=3)
    assert [(r["depth"], r["refiners"], r["run"]) for r in ablation] == [
        (1, False, "nap-depth1-norefine@nap"), (2, False, "nap-depth2-norefine@nap"), (2, True, "nap-depth2@nap"),
        (3, False, "nap-norefine@nap"), (3, True, "nap@nap"), (4, False, "nap-depth4-norefine@nap"),
        (4, True, "nap-depth4@nap")]


def fake_results() -> dict:
    """Results as replicate.collect writes them, with made-up numbers: every part, every run."""
    rng = np.random.default_rng(0)
    tasks, eval_eps = list(synthetic.TASKS), ["1/255", "4/255"]
    ablation = replicate.ablation_rows(4, 3)
    transfer = replicate.transfer_rows()
    comparison = replicate.comparison_runs(replicate.METHODS, replicate.FAMILIES)
    names = list(dict.fromkeys(comparison + [r["run"] for r in ablation + transfer]))
    cell = lambda: {"clean": float(rng.uniform(40, 95)), "robust": float(rng.uniform(0, 40)), "n_samples": 200,
                    "steps": 100, "n_seeds": 1, "clean_std": None, "robust_std": None}
    runs = {n: {"params": 1000 * i, "pgd": {e: {t: cell() for t in tasks} for e in eval_eps + ["0.5/255", "2/255"]},
                "autoattack": {e: {"synthetic": cell()} for e in eval_eps}} for i, n in enumerate(names)}
    own = {m: replicate.own_run(m) for m in replicate.METHODS}
    sweep = {n: {e: runs[n]["pgd"]["1/255"]["synthetic"]["clean" if e == "0" else "robust"] if e in ("0", "1/255")
                 else runs[n]["pgd"][e]["synthetic"]["robust"] for e in replicate.SWEEP} for n in own.values()}
    return {"arch": "toy", "training_task": "synthetic", "tasks": tasks, "eval_eps": eval_eps, "sweep_eps": replicate.SWEEP,
            "samples": 200, "aa_samples": 200, "steps": 100, "seeds": [1], "comparison": comparison, "own": own,
            "runs": runs, "sweep": sweep, "ablation": ablation, "transfer": transfer, "paired": []}


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
            "labels": [t.get_text() for legend in fig.legends for t in legend.get_texts()],
            "axes": [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]}
        return save(fig, path)

    monkeypatch.setattr(figures, "save", capture)
    results = fake_results()
    paths = figures.write_all(results, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == list(figures.FILES)
    for p in paths:
        assert os.path.getsize(p) > 20_000
    assert [x.split(";")[0] for x, _ in drawn["eps-sweep.png"]["axes"]] == ["eps (/255)"]
    assert drawn["eps-sweep.png"]["axes"][0][1] == "robust accuracy (%)"
    assert drawn["eps-sweep.png"]["labels"] == [f"{run}\n{figures.describe(run)}" for run in results["sweep"]]
    assert all(y.endswith("accuracy (%)") or "accuracy (%)," in y for f in drawn.values() for _, y in f["axes"])
    assert (f"tecoa ({results['runs']['tecoa']['params']:,} trained parameters)\nTeCoA, own recipe (control)"
            in drawn["frozen-vs-finetuned.png"]["labels"])
    # each method is drawn in its colour wherever it appears, and its colour appears nowhere else
    where = {"nap": set(figures.FILES), "tecoa": {"eps-sweep.png", "frozen-vs-finetuned.png"},
             "advmaple": {"eps-sweep.png", "transfer.png"}, "nap-norefine": {"depth-refiners.png", "transfer.png"},
             "advvlp": {"eps-sweep.png"}}
    for method, files in where.items():
        for name in figures.FILES:
            n = pixels_of(tmp_path / name, figures.COLOURS[method])
            assert (n > 50) == (name in files), (method, name, n)
    assert figures.colour("advmaple@nap") == figures.COLOURS["advmaple"] and figures.other_recipe("advmaple@nap")
    assert not figures.other_recipe("advmaple@baselines") and figures.other_recipe("nap@baselines")
    (tmp_path / "part").mkdir()  # a figure is drawn only when its part ran
    partial = {**results, "ablation": [], "transfer": [], "sweep": {}}
    assert figures.write_all(partial, str(tmp_path / "part")) == [str(tmp_path / "part" / "frozen-vs-finetuned.png")]


def test_figures_tell_every_series_apart_at_readme_width(tmp_path, monkeypatch):
    """Issue #23: nap and nap@baselines, advmaple and advmaple@nap shared colour and marker and the legend hid the
    dash under the marker; equal accuracies drew on one another; the text was small at the README's width. Every
    series of every figure now has its own colour, marker (fill) and line style, or colour and hatch; each model its
    own marker; the legend one entry per series, in words, with a dash visible beside each marker; the eps sweep's
    points at one eps apart; and every text at least 12 px tall when the PNG is shown 800 px wide."""
    import matplotlib.colors
    import matplotlib.image
    import matplotlib.text
    results = fake_results()
    tied = {"nap@baselines": "nap@nap", "advmaple@nap": "advmaple@baselines", "fare": "advvlp@baselines"}
    results["sweep"] = {run: dict(results["sweep"].get(tied.get(run, run)) or results["sweep"]["zeroshot"])
                        for run in results["comparison"]}  # every run of both recipes, some on one another
    drawn, save = {}, figures.save
    hexa = lambda c: matplotlib.colors.to_hex(c, keep_alpha=False)

    def capture(fig, path):
        fig.canvas.draw()
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
        drawn[os.path.basename(path)] = {"fig": fig, "legends": legends, "dpi": figures.DPI,
                                         "smallest": min(t.get_fontsize() for t in texts)}
        return save(fig, path)

    monkeypatch.setattr(figures, "save", capture)
    paths = figures.write_all(results, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == list(figures.FILES)
    for name, d in drawn.items():
        fig, (legend,) = d["fig"], d["legends"]  # one legend per figure
        entries = [t.get_text() for t in legend.get_texts()]
        for ax in fig.axes:
            lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
            bars = list(ax.containers)
            assert bool(lines) != bool(bars), name  # every series a line, or every series a set of bars
            if lines:
                style = lambda l: (hexa(l.get_color()), l.get_marker(), l.get_markerfacecolor() == "white",
                                   l.get_linestyle())
                assert len({style(l) for l in lines}) == len(lines), name
                assert [l.get_label() for l in lines] == entries, name  # one legend entry per series, in order
                for line, handle in zip(lines, legend.get_lines()):
                    assert style(handle) == style(line), (name, line.get_label())
                    if line.get_linestyle() == "--":  # a whole dash and gap on either side of the marker
                        beside = (legend.handlelength * legend.prop.get_size_in_points()
                                  - handle.get_markersize()) / 2
                        period = sum(matplotlib.rcParams["lines.dashed_pattern"]) * handle.get_linewidth()
                        assert beside >= period, (name, line.get_label(), beside, period)
            else:
                style = lambda b: (hexa(b.patches[0].get_facecolor()), b.patches[0].get_hatch())
                assert len({style(b) for b in bars}) == len(bars), name
                assert [b.get_label() for b in bars] == entries, name
                for bar, handle in zip(bars, legend.legend_handles):
                    assert (hexa(handle.get_facecolor()), handle.get_hatch()) == style(bar), (name, bar.get_label())
        width = matplotlib.image.imread(str(tmp_path / name)).shape[1]
        assert d["smallest"] * d["dpi"] / 72 * 800 / width >= 12, (name, d["smallest"], width)
    sweep = drawn["eps-sweep.png"]["fig"].axes[0]
    lines = [line for line in sweep.get_lines() if not line.get_label().startswith("_")]
    assert len(lines) == len(results["sweep"]) == 15
    models = {line.get_label().split("\n")[0].split("@")[0]: line.get_marker() for line in lines}
    assert len(set(models.values())) == len(models)  # each model its own marker
    for run, line in zip(results["sweep"], lines):
        words = line.get_label().split("\n")[1]
        assert line.get_label().startswith(run + "\n") and words.startswith(figures.MODEL_NAMES[run.split("@")[0]])
        assert words.endswith("(own)") == (run in results["own"].values() and "@" in run), run
    assert "nap@nap\nNAP-Tuning, NAP's recipe (own)" in [line.get_label() for line in lines]
    # at each eps the runs' points are at least half a marker apart, even where their accuracies are equal
    xy = np.array([sweep.transData.transform(line.get_xydata()) for line in lines]) * 72 / sweep.figure.dpi
    for k in range(xy.shape[1]):
        gaps = np.abs(xy[:, None, k, 0] - xy[None, :, k, 0])[~np.eye(len(lines), dtype=bool)]
        assert gaps.min() >= 0.5 * lines[0].get_markersize(), k


def test_the_toy_clip_is_built_first_so_every_training_is_keyed_by_an_existing_backbone(tmp_path, monkeypatch):
    """An interrupted first job once left a run record naming a backbone file that did not exist yet, and the
    rerun deleted the finished epochs as 'trained on another backbone'. The toy CLIP is now built first."""
    toy = tmp_path / "cache" / "toy.pt"
    calls = []

    def fake_run(args, log=None, env=None):
        calls.append(args[0])
        if args[0] == "toyclip.py":
            toy.parent.mkdir()
            toy.write_bytes(b"toy weights")
        elif args[0] == "train.py":
            record = json.loads(open(os.path.join(args[args.index("--out") + 1], "replicate.json")).read())
            assert record["key"]["backbone"]["arch_sha256"] == runtime.sha256_file(str(toy))
        return 0.0

    monkeypatch.setattr(runtime, "backbone_file", lambda arch: str(toy) if arch == "toy" else None)
    monkeypatch.setattr(replicate, "run", fake_run)
    replicate.main(["--out", str(tmp_path / "rep"), "--methods", "advpt", "--recipes", "baselines", "--jobs", "1",
                    "--eval-eps", "4/255", "--sweep-eps", "4/255"])
    assert calls[0] == "toyclip.py" and calls[1] == "train.py" and set(calls[2:]) == {"evaluate.py"}


def test_figures_cli_help_redraws_and_refuses_in_one_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "figures.py"), *a], capture_output=True,
                                    text=True, timeout=1800, env={**os.environ, "PYTHONPATH": ROOT})
    assert run("--help").returncode == 0 and "results.json" in run("--help").stdout
    missing = run(str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
    (tmp_path / "results.json").write_text(json.dumps(fake_results()))
    drawn = run(str(tmp_path))
    assert drawn.returncode == 0 and sorted(os.listdir(tmp_path)) == sorted(["results.json", *figures.FILES])
    (tmp_path / "results.json").write_text("[1, 2]")
    bad = run(str(tmp_path))
    assert bad.returncode == 2 and "not a results.json" in bad.stderr and "Traceback" not in bad.stderr
