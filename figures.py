"""figures.py: replicate.py's figures (PNG), drawn from its results.json alone.

    python figures.py runs/replication          # redraw every figure from runs/replication/results.json

Four figures, each written only when its results exist:
  eps-sweep.png              robust accuracy vs eps (PGD-100, training task), zero-shot CLIP and every method
  depth-refiners.png         clean and robust accuracy vs prompt depth, with and without TokenRefiners
                             (the paper's Figures 4 and 5)
  frozen-vs-finetuned.png    NAP-Tuning (frozen encoder) vs TeCoA and FARE (fine-tuned encoder), per task,
                             trained parameters in the legend (the paper's Figure 3)
  transfer.png               NAP variants' clean and robust accuracy on the transfer tasks

Every run is drawn in one colour, COLOURS[its model], and with one marker, MARKERS[its model], in every
figure; a run trained with another method's recipe family (`advmaple@nap`, `nap@baselines`) keeps its model's
colour and marker and is dashed with hollow markers (lines) or hatched (bars), so that no two runs of a figure
share colour, marker and line style. Legends name each run model@recipe and, below, in words ("NAP-Tuning,
NAP's recipe (own)"); their handles are long enough to show a dash on either side of the marker. In the eps
sweep the radii are evenly spaced and the runs' points at each radius sit side by side, a small step apart,
so that equal accuracies do not hide one another. The figures are WIDTH inches wide with the legend under
the axes, so that their text reads at the README's width (about 800 px).
"""
import functools
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
# Each model also has its own marker, so that its lines read without colour (and in grey print).
MARKERS = {
    "zeroshot": "X", "advpt": "v", "advvpt": "^", "advvlp": "s", "advmaple": "D", "nap": "o", "tecoa": "P",
    "fare": "*", "nap-norefine": "h", "nap-zeroinit": "p", "nap-both": "d", "nap-text": ">", "nap-depth1": "<",
    "nap-depth2": "8",
}
BIGGER = {"*": {"markersize": 10}, "+": {"markersize": 9}}  # thin markers, drawn larger to look as large as the rest
SPARE_MARKERS = ("H", "<", ">", "8", "p", "d", "1", "2", "3", "4", "+", "x", "|", "_")  # for a style already taken
HATCH, SPARE_HATCHES = "///", ("..", "xx", "\\\\\\", "++", "oo", "--", "||")
# The README terms: runs are named model@recipe, "(own)" marks each method's own recipe, and zeroshot, tecoa
# and fare are the controls.
MODEL_NAMES = {
    "zeroshot": "zero-shot CLIP", "advpt": "AdvPT", "advvpt": "AdvVPT", "advvlp": "AdvVLP", "advmaple": "AdvMaPLe",
    "nap": "NAP-Tuning", "tecoa": "TeCoA", "fare": "FARE", "nap-norefine": "NAP's prompts without TokenRefiners",
    "nap-zeroinit": "NAP-Tuning, refiners start as the identity", "nap-both": "NAP-Tuning, refiners on both towers",
    "nap-text": "NAP-Tuning, refiners on the text tower",
}
RECIPE_NAMES = {"baselines": "baselines' recipe", "nap": "NAP's recipe"}
# Readable where the README shows a figure, about 800 px wide: figures are WIDTH inches wide, so a FONT size of
# s points appears there at about s * 800 / (WIDTH * 72) = 1.4 s pixels (14 px for the legends), whatever DPI is.
WIDTH, DPI = 8, 150
FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10.5, "ytick.labelsize": 10.5,
        "legend.fontsize": 10, "figure.titlesize": 12}
LINE = {"linewidth": 1.8, "markersize": 7}
# Legend handles long enough that a dashed line shows a dash and a gap on each side of its marker.
LINE_LEGEND = {"handlelength": 4.5, "markerscale": 0.9}
BAR_LEGEND = {"handlelength": 2.6, "handleheight": 1.6}  # large enough to show a bar's hatch
FILES = ("eps-sweep.png", "depth-refiners.png", "frozen-vs-finetuned.png", "transfer.png")


def model_of(run: str) -> str:
    """The model of a run: the part before '@' (nap@baselines -> nap)."""
    return run.partition("@")[0]


def colour(run: str) -> str:
    """A run's colour: its model's (the part before '@'), e.g. nap@baselines -> nap's."""
    return COLOURS.get(run) or COLOURS.get(model_of(run), "#000000")


def marker(run: str) -> str:
    """A run's marker: its model's, e.g. nap@baselines -> nap's."""
    return MARKERS.get(run) or MARKERS.get(model_of(run), "o")


def other_recipe(run: str) -> bool:
    """True for a run trained with another method's recipe family than its own (nap@baselines, advmaple@nap)."""
    model, _, family = run.partition("@")
    return bool(family) and family != recipes.METHOD_RECIPE.get(model, "nap")


def describe(run: str) -> str:
    """A run in words, as the README names it: 'NAP-Tuning, NAP's recipe (own)', 'TeCoA, own recipe (control)'."""
    model, _, family = run.partition("@")
    words = MODEL_NAMES.get(model, model)
    if not family:
        return f"{words} (control)" if model == "zeroshot" else f"{words}, own recipe (control)"
    own = " (own)" if recipes.METHOD_RECIPE.get(model) == family else ""
    return f"{words}, {RECIPE_NAMES.get(family, family + ' recipe')}{own}"


def label(run: str, detail: str = "") -> str:
    """A legend label: the run's name (and detail) on the first line, the run in words on the second."""
    return f"{run}{detail}\n{describe(run)}"


def line_styles(runs: list) -> dict:
    """{run: plot keywords}: its model's colour and marker; another method's recipe family dashed, hollow markers.
    Every run gets a combination of colour, marker, marker fill and line style of its own (a spare marker where
    two runs of unknown models would share one)."""
    styles, taken = {}, set()
    for run in runs:
        dashed, shape = other_recipe(run), marker(run)
        if (colour(run), shape, dashed) in taken:
            shape = next(m for m in SPARE_MARKERS if (colour(run), m, dashed) not in taken)
        taken.add((colour(run), shape, dashed))
        styles[run] = {"color": colour(run), "marker": shape, "linestyle": "--" if dashed else "-",
                       "markerfacecolor": "white" if dashed else colour(run), "markeredgecolor": colour(run),
                       "markeredgewidth": 1.5 if dashed else 1.0, **BIGGER.get(shape, {})}
    return styles


def bar_styles(runs: list) -> dict:
    """{run: bar keywords}: its model's colour; another method's recipe family hatched; each combination once."""
    styles, taken = {}, set()
    for run in runs:
        hatch = HATCH if other_recipe(run) else None
        if (colour(run), hatch) in taken:
            hatch = next(h for h in SPARE_HATCHES if (colour(run), h) not in taken)
        taken.add((colour(run), hatch))
        styles[run] = {"color": colour(run), "hatch": hatch, "edgecolor": "white", "linewidth": 0}
    return styles


def eps_value(eps: str) -> float:
    """'0.5/255' -> 0.5, '0' -> 0.0: a radius in units of 1/255, for the x axis."""
    num, _, den = eps.partition("/")
    return float(num) * 255 / float(den) if den else float(num) * 255


def cell(results: dict, run: str, attack: str, eps: str, task: str, key: str):
    """One number of results.json: runs[run][attack][eps][task][key], or None."""
    return results["runs"].get(run, {}).get(attack, {}).get(eps, {}).get(task, {}).get(key)


def legend_name(results: dict, run: str) -> str:
    """'nap@nap (272,000 trained parameters)' over 'NAP-Tuning, NAP's recipe (own)'."""
    params = results["runs"].get(run, {}).get("params")
    return label(run, "" if params is None else f" ({params:,} trained parameters)")


def styled(draw):
    """Draws with FONT's sizes."""
    @functools.wraps(draw)
    def wrapped(*args, **kwargs):
        with plt.rc_context(FONT):
            return draw(*args, **kwargs)
    return wrapped


def save(fig, path: str) -> str:
    """Writes the figure as a PNG at DPI, cropped to what is drawn (legend under the axes included), and closes it."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def legend_below(fig, ax, height: float, **keywords):
    """One legend under the axes, in two columns where they fit WIDTH, else one; the figure is made height inches
    plus the legend's height tall, so that the axes keep their size however many runs there are."""
    handles, labels = ax.get_legend_handles_labels()
    renderer = fig.canvas.get_renderer()
    for ncol in (2, 1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False, columnspacing=1.5,
                            labelspacing=0.7, **keywords)
        if ncol == 1 or legend.get_window_extent(renderer).width <= fig.get_figwidth() * fig.dpi:
            break
        legend.remove()
    fig.set_size_inches(fig.get_figwidth(), height + legend.get_window_extent(renderer).height / fig.dpi + 0.15)


def accuracy_axis(ax, label: str, values: list):
    """y axis in percent from 0: up to 100 for clean accuracy, to a little above the largest value for robust."""
    ax.set_ylabel(label)
    top = 100 if label.startswith("clean") else min(100, 5 * int(max([v for v in values if v is not None] + [0]) / 5 + 2))
    ax.set_ylim(0, top)


def grouped_bars(ax, groups: list, runs: list, value, ylabel: str, labels: dict):
    """Bars for each run within each group (x tick); value(run, group) -> number or None (not drawn)."""
    width = 0.8 / max(len(runs), 1)
    styles = bar_styles(runs)
    for i, run in enumerate(runs):
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ys = [value(run, group) for group in groups]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               label=labels.get(run, run), **styles[run])
    ax.set_xticks(range(len(groups)), [g.replace("synthetic-", "") for g in groups])
    accuracy_axis(ax, ylabel, [value(run, group) for run in runs for group in groups])
    ax.grid(axis="y", alpha=0.3)


@styled
def eps_sweep(results: dict, path: str):
    """Figure (a): robust accuracy (%) vs eps (/255) on the training task, one line per run; None without data.

    The radii are evenly spaced (each doubles the last), and at each radius the runs' points sit side by side,
    a small step apart in the legend's order, so that equal or close accuracies stay visible."""
    sweep = results.get("sweep", {})
    if not sweep:
        return None
    radii = sorted({e for points in sweep.values() for e in points}, key=eps_value)
    position = {e: i for i, e in enumerate(radii)}
    step = min(0.08, 0.6 / max(len(sweep), 1))
    styles = line_styles(list(sweep))
    fig, ax = plt.subplots(figsize=(WIDTH, 5), layout="constrained")
    values = []
    for i, (run, points) in enumerate(sweep.items()):
        shift = (i - (len(sweep) - 1) / 2) * step
        line = sorted((position[e] + shift, v) for e, v in points.items() if v is not None)
        if line:
            ax.plot(*zip(*line), clip_on=False, label=label(run), **{**LINE, **styles[run]})
            values += [v for _, v in line]
    ax.set_xticks(range(len(radii)), [f"{eps_value(e):g}" for e in radii])
    ax.set_xlim(-0.5, len(radii) - 0.5)
    ax.set_xlabel("eps (/255); at each eps the runs' points sit side by side")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(f"PGD-{results.get('steps', 100)} on {results.get('training_task', 'the training task')} "
                 f"({results.get('samples', '?')} images); eps 0 is clean accuracy")
    ax.set_ylim(-2, min(100, 10 * int(max(values + [0]) / 10 + 1)))  # below 0: points at 0 clear of the axis
    ax.grid(alpha=0.3)
    legend_below(fig, ax, 5, **LINE_LEGEND)
    return save(fig, path)


@styled
def depth_refiners(results: dict, path: str):
    """Figure (b): clean and robust accuracy (%) vs prompt depth J, with and without TokenRefiners; None without data."""
    rows = results.get("ablation", [])
    if not rows:
        return None
    task, eval_eps = results["training_task"], results["eval_eps"]
    panels = [("clean", eval_eps[0], "clean accuracy (%)")] + [("robust", e, f"robust accuracy (%), eps {e}")
                                                               for e in eval_eps]
    styles = line_styles(["nap@nap", "nap-norefine@nap"])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(WIDTH, 2.7 * len(panels)), 4), squeeze=False,
                             layout="constrained")
    for ax, (key, eps, ylabel) in zip(axes[0], panels):
        values = []
        for refiners, method, name in ((True, "nap@nap", "with TokenRefiners"),
                                       (False, "nap-norefine@nap", "without TokenRefiners")):
            line = [(r["depth"], cell(results, r["run"], "pgd", eps, task, key)) for r in rows if r["refiners"] == refiners]
            line = [(d, v) for d, v in line if v is not None]
            if line:
                ax.plot(*zip(*line), clip_on=False, label=name, **{**LINE, **styles[method]})
                values += [v for _, v in line]
        ax.set_xlabel("prompt depth J (layers)")
        accuracy_axis(ax, ylabel, values)
        ax.set_xticks(sorted({r["depth"] for r in rows}))
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, frameon=False, **LINE_LEGEND)
    fig.suptitle(f"NAP-Tuning (NAP's recipe) on {task}: depth and TokenRefiners (PGD-{results.get('steps', 100)})")
    return save(fig, path)


@styled
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
    fig, axes = plt.subplots(2, 1, figsize=(max(WIDTH, 1.3 * len(groups)), 7), sharex=True, layout="constrained")
    grouped_bars(axes[0], groups, runs, value("clean"), "clean accuracy (%)", labels)
    grouped_bars(axes[1], groups, runs, value("robust"), f"robust accuracy (%), PGD eps {eps}", labels)
    axes[0].set_title(f"frozen image encoder (zeroshot, {nap}) vs fine-tuned image encoder (tecoa, fare)")
    legend_below(fig, axes[0], 7, **BAR_LEGEND)
    return save(fig, path)


@styled
def transfer(results: dict, path: str):
    """Figure (d): the transfer investigation's variants, clean and robust accuracy per task; None without data."""
    rows = results.get("transfer", [])
    if not rows:
        return None
    eps, tasks = results["eval_eps"][0], results["tasks"]
    runs = [r["run"] for r in rows]
    labels = {r["run"]: f"{r['run']}\n{r['variant']}" for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(WIDTH, 1.5 * len(tasks)), 7.5), sharex=True, layout="constrained")
    get = lambda key: lambda run, task: cell(results, run, "pgd", eps, task, key)
    grouped_bars(axes[0], tasks, runs, get("clean"), "clean accuracy (%)", labels)
    grouped_bars(axes[1], tasks, runs, get("robust"), f"robust accuracy (%), PGD eps {eps}", labels)
    axes[0].set_title(f"NAP variants trained on {results['training_task']}, evaluated zero-shot on every task")
    legend_below(fig, axes[0], 7.5, **BAR_LEGEND)
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
