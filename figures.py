"""figures.py: replicate.py's figures (PNG), drawn from its results.json alone.

    python figures.py runs/replication          # redraw every figure from runs/replication/results.json

Four figures, each written only when its results exist:
  eps-sweep.png              robust accuracy vs eps (PGD-100, training task), zero-shot CLIP and every method
  depth-refiners.png         clean and robust accuracy vs prompt depth, with and without TokenRefiners
                             (the paper's Figures 4 and 5)
  frozen-vs-finetuned.png    NAP-Tuning (frozen encoder) vs TeCoA and FARE (fine-tuned encoder), per task,
                             trained parameters in the legend (the paper's Figure 3)
  transfer.png               NAP variants' clean and robust accuracy on the transfer tasks

Every run is drawn in one colour, COLOURS[its method], in every figure; a run trained with another
method's recipe family (`advmaple@nap`, `nap@baselines`) keeps its method's colour and is dashed or hatched.
"""
import json
import os

import cmdline
import recipes


def read_results(argv=None) -> tuple:
    """python figures.py [FOLDER] -> (FOLDER, its results.json); a missing or foreign file is one line, exit status 2."""
    p = cmdline.Parser(description="Redraw replicate.py's figures from its results.json.")
    p.add_argument("folder", nargs="?", default="runs/replication", help="replicate.py's --out")
    folder = p.parse_args(argv).folder
    path = os.path.join(folder, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        cmdline.fail(f"{path} does not exist; run python replicate.py (--out {folder}) first, or name its folder")
    except json.JSONDecodeError:
        results = None
    if not isinstance(results, dict) or not {"runs", "tasks", "eval_eps"} <= set(results):
        cmdline.fail(f"{path} is not a results.json written by replicate.py; run python replicate.py again")
    cmdline.check_writable(folder, folder=True, flag="FOLDER")
    return folder, results


if __name__ == "__main__":  # a missing or foreign results.json is refused here, before matplotlib loads
    cmdline.run_cli(read_results)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {
    "zeroshot": "#7f7f7f",
    "advpt": "#1f77b4",
    "advvpt": "#17becf",
    "advvlp": "#9467bd",
    "advmaple": "#2ca02c",
    "nap": "#d62728",
    "tecoa": "#ff7f0e",
    "fare": "#8c564b",
    # NAP variants of the comparison, the transfer investigation and the ablation
    "nap-norefine": "#e377c2",
    "nap-zeroinit": "#bcbd22",
    "nap-both": "#ff9896",
    "nap-text": "#c49c94",
    "nap-depth1": "#aec7e8",
    "nap-depth2": "#98df8a",
}
FILES = ("eps-sweep.png", "depth-refiners.png", "frozen-vs-finetuned.png", "transfer.png")


def colour(run: str) -> str:
    """A run's colour: its model's (the part before '@'), e.g. nap@baselines -> nap's."""
    return COLOURS.get(run) or COLOURS.get(run.split("@")[0], "#000000")


def other_recipe(run: str) -> bool:
    """True for a run trained with another method's recipe family than its own (nap@baselines, advmaple@nap)."""
    model, _, family = run.partition("@")
    return bool(family) and family != recipes.METHOD_RECIPE.get(model, "nap")


def eps_value(eps: str) -> float:
    """'0.5/255' -> 0.5, '0' -> 0.0: a radius in units of 1/255, for the x axis."""
    num, _, den = eps.partition("/")
    return float(num) * 255 / float(den) if den else float(num) * 255


def cell(results: dict, run: str, attack: str, eps: str, task: str, key: str):
    """One number of results.json: runs[run][attack][eps][task][key], or None."""
    return results["runs"].get(run, {}).get(attack, {}).get(eps, {}).get(task, {}).get(key)


def legend_name(results: dict, run: str) -> str:
    """'nap (12,345 trained parameters)'."""
    params = results["runs"].get(run, {}).get("params")
    return run if params is None else f"{run} ({params:,} trained parameters)"


def save(fig, path: str) -> str:
    """Writes the figure as a PNG (legends outside the axes included) and closes it."""
    fig.tight_layout()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    fig.savefig(path, dpi=100, bbox_inches="tight", bbox_extra_artists=legends)
    plt.close(fig)
    return path


def outside_legend(ax):
    """The legend to the right of the axes, clear of the data."""
    legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    legend.set_in_layout(False)  # the axes keep their size; savefig's tight box widens the image instead


def accuracy_axis(ax, label: str, values: list):
    """y axis in percent from 0: up to 100 for clean accuracy, to a little above the largest value for robust."""
    ax.set_ylabel(label)
    top = 100 if label.startswith("clean") else min(100, 5 * int(max([v for v in values if v is not None] + [0]) / 5 + 2))
    ax.set_ylim(0, top)


def grouped_bars(ax, groups: list, runs: list, value, ylabel: str, labels: dict):
    """Bars for each run within each group (x tick); value(run, group) -> number or None (not drawn)."""
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ys = [value(run, group) for group in groups]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               color=colour(run), hatch="//" if other_recipe(run) else None, edgecolor="white", linewidth=0,
               label=labels.get(run, run))
    ax.set_xticks(range(len(groups)), [g.replace("synthetic-", "") for g in groups])
    accuracy_axis(ax, ylabel, [value(run, group) for run in runs for group in groups])
    ax.grid(axis="y", alpha=0.3)


def eps_sweep(results: dict, path: str):
    """Figure (a): robust accuracy (%) vs eps (/255) on the training task, one line per run; None without data."""
    sweep = results.get("sweep", {})
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, points in sweep.items():
        xs = [eps_value(e) for e, v in points.items() if v is not None]
        ys = [v for v in points.values() if v is not None]
        ax.plot(xs, ys, marker="o", markersize=7, linewidth=2, color=colour(run),
                linestyle="--" if other_recipe(run) else "-", label=run)
    ax.set_xlabel("eps (/255)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(f"PGD-{results.get('steps', 100)} on {results.get('training_task', 'the training task')} "
                 f"({results.get('samples', '?')} images); eps 0 is clean accuracy")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    outside_legend(ax)
    return save(fig, path)


def depth_refiners(results: dict, path: str):
    """Figure (b): clean and robust accuracy (%) vs prompt depth J, with and without TokenRefiners; None without data."""
    rows = results.get("ablation", [])
    if not rows:
        return None
    task, eval_eps = results["training_task"], results["eval_eps"]
    panels = [("clean", eval_eps[0], "clean accuracy (%)")] + [("robust", e, f"robust accuracy (%), eps {e}")
                                                               for e in eval_eps]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (key, eps, ylabel) in zip(axes[0], panels):
        values = []
        for refiners, method, name in ((True, "nap", "with TokenRefiners"), (False, "nap-norefine", "without TokenRefiners")):
            line = [(r["depth"], cell(results, r["run"], "pgd", eps, task, key)) for r in rows if r["refiners"] == refiners]
            line = [(d, v) for d, v in line if v is not None]
            if line:
                ax.plot(*zip(*line), marker="o", markersize=7, linewidth=2, color=colour(method), label=name)
                values += [v for _, v in line]
        ax.set_xlabel("prompt depth J (layers)")
        accuracy_axis(ax, ylabel, values)
        ax.set_xticks(sorted({r["depth"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"NAP on {task}: depth and TokenRefiners (PGD-{results.get('steps', 100)})")
    return save(fig, path)


def frozen_vs_finetuned(results: dict, path: str):
    """Figure (c): NAP (frozen encoder) vs TeCoA and FARE (fine-tuned encoder), clean and robust per task; None without data."""
    nap = results.get("own", {}).get("nap", "nap@nap")
    runs = [r for r in ("zeroshot", nap, "tecoa", "fare") if r in results["runs"]]
    if nap not in runs or not {"tecoa", "fare"} & set(runs):
        return None
    eps, tasks = results["eval_eps"][0], results["tasks"]
    groups = tasks + ["average"]

    def value(key):
        def get(run, task):
            if task != "average":
                return cell(results, run, "pgd", eps, task, key)
            values = [cell(results, run, "pgd", eps, t, key) for t in tasks]
            return None if None in values else sum(values) / len(values)
        return get

    labels = {r: legend_name(results, r) for r in runs}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 7), sharex=True)
    grouped_bars(axes[0], groups, runs, value("clean"), "clean accuracy (%)", labels)
    grouped_bars(axes[1], groups, runs, value("robust"), f"robust accuracy (%), PGD eps {eps}", labels)
    axes[0].set_title(f"frozen image encoder (zeroshot, {nap}) vs fine-tuned image encoder (tecoa, fare)")
    outside_legend(axes[0])
    return save(fig, path)


def transfer(results: dict, path: str):
    """Figure (d): the transfer investigation's variants, clean and robust accuracy per task; None without data."""
    rows = results.get("transfer", [])
    if not rows:
        return None
    eps, tasks = results["eval_eps"][0], results["tasks"]
    runs = [r["run"] for r in rows]
    labels = {r["run"]: f"{r['run']}: {r['variant']}" for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.8 * len(tasks)), 8), sharex=True)
    get = lambda key: lambda run, task: cell(results, run, "pgd", eps, task, key)
    grouped_bars(axes[0], tasks, runs, get("clean"), "clean accuracy (%)", labels)
    grouped_bars(axes[1], tasks, runs, get("robust"), f"robust accuracy (%), PGD eps {eps}", labels)
    axes[0].set_title(f"NAP variants trained on {results['training_task']}, evaluated zero-shot on every task")
    outside_legend(axes[0])
    return save(fig, path)


def write_all(results: dict, out: str) -> list:
    """Writes every figure whose results exist into the folder out; returns their paths."""
    drawn = [eps_sweep, depth_refiners, frozen_vs_finetuned, transfer]
    paths = [draw(results, os.path.join(out, name)) for draw, name in zip(drawn, FILES)]
    return [p for p in paths if p]


def main(argv=None):
    """python figures.py [FOLDER]: redraws the figures from FOLDER/results.json and prints their paths."""
    folder, results = read_results(argv)
    print("\n".join(write_all(results, folder)))


if __name__ == "__main__":
    cmdline.run_cli(main)
