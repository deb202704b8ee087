"""protocols.py: the field's evaluation protocols, each one command, on the toy world or on real data.

    python protocols.py base-to-new          # CoCoOp's base-to-new generalisation (also MaPLe's, FAP's)
    python protocols.py few-shot             # train and test on one dataset at 1, 2, 4, 8 and 16 shots (APT, FAP)
    python protocols.py domain               # trained on the source, tested on its shifted domains
    python protocols.py cross-dataset        # trained on the source, tested zero-shot on other datasets
    python protocols.py domain --arch ViT-B/16 --data-root ~/data     # the same on ImageNet and its variants

The protocols (datasets: real / toy; the toy's are synthetic.py's tasks and domains):
  base-to-new: per dataset, the classes split into base and new by Dassl's rule (data.subsample_classes:
      labels sorted, the first ceil(n/2) base, the rest new, relabelled from 0); each method trains on the
      base classes of the training split and is scored on the base and on the new classes of the test
      split; the harmonic mean HM = 2 base new / (base + new) of each, and of the averages over datasets
      (as CoCoOp reports it). Real: the 11 datasets of CoOp; toy: the four tasks with at least 4
      classes (synthetic-size has 3, which leaves one new class and nothing to tell apart).
  few-shot: per dataset and per --shots count, train on that many images per class and test on the
      same dataset. Real: the 11 datasets; toy: synthetic, synthetic-colour and synthetic-position.
  domain: train on the source (ImageNet / synthetic) and test on it and its shifted domains
      (ImageNet-V2, -Sketch, -A, -R / synthetic-v2, -sketch, -negative).
  cross-dataset: train on the source and test on the paper's other datasets (evaluate.py's default
      list) / the other synthetic tasks.
Each method trains with its own source's recipe (recipes.py; the toy's changes as in replicate.py), or
with --recipe baselines|nap every prompt method trains with that one family, the controlled comparison of
replicate.py; with the recipe's shots unless the protocol sets them. Each is scored clean and under --attack at --eps
(PGD-100 at 1/255 by default) on a seeded subset of --samples test images per dataset (default: all
real test images; 200 on the toy). Zero-shot CLIP has nothing to train.

Reuse: every training is named by what it trains (method, recipe, dataset, shots, classes, seed) and
every evaluation by what it scores, under --out (default runs/protocols): a training or evaluation
that another protocol already ran with the same command (the zero-shot model on a dataset, the
ImageNet-trained model of `domain` and `cross-dataset`) is reused, announced; evaluate.py re-checks
each result against its checkpoint, backbone and data. Text features are computed once per dataset
and model inside evaluate.py.

Into --out/PROTOCOL (with -recipe-NAME, -ATTACK or -epsE added when those flags are not the defaults):
TABLE.md (methods as rows; datasets and the average as columns; clean / robust accuracy, mean +- std
over --seeds) and results.json (every number of the table, per seed).
"""
import argparse
import os
import shlex
import sys
import time

import cmdline

PROTOCOLS = ("base-to-new", "few-shot", "domain", "cross-dataset")
COOP11 = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # CoOp's and CoCoOp's 11 datasets
DATASETS = {  # protocol: (real datasets, toy datasets); for domain and cross-dataset the first is the source
    "base-to-new": (COOP11, ["synthetic", "synthetic-colour", "synthetic-texture", "synthetic-position"]),
    "few-shot": (COOP11, ["synthetic", "synthetic-colour", "synthetic-position"]),
    "domain": (["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
               ["synthetic", "synthetic-v2", "synthetic-sketch", "synthetic-negative"]),
    "cross-dataset": (None, None),  # evaluate.py's defaults: data.PAPER_EVAL / synthetic.TASKS
}
SHOTS = [1, 2, 4, 8, 16]  # the few-shot counts of CoOp, APT and FAP
METHODS = ["zeroshot", "advpt", "advvpt", "advvlp", "advmaple", "nap"]
RECIPES = ["own", "baselines", "nap"]  # each method's own (recipes.METHOD_RECIPE), or one family for all
ATTACK, EPS = "pgd", "1/255"  # PGD-100 at 1/255, the paper's evaluation [P]


class Formatter(cmdline.DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each default and the epilog's layout kept."""


def parse_args(argv=None):
    p = cmdline.Parser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]))
    p.formatter_class = Formatter
    p.add_argument("protocol", choices=PROTOCOLS, help="which protocol to run")
    p.add_argument("--arch", default="toy", help="toy (synthetic tasks), or ViT-B/16 or a weights file (real datasets)")
    p.add_argument("--data-root", default=None, help="where the real datasets lie (default: $NAP_DATA, else ./data)")
    p.add_argument("--methods", nargs="+", default=["zeroshot", "advmaple", "nap"], choices=METHODS,
                   help="the rows of the table: zero-shot CLIP, the strongest baseline of [P]'s tables and NAP-Tuning "
                        "by default [C]")
    p.add_argument("--recipe", default="own", choices=RECIPES,
                   help="own: each method with its source's recipe, as papers compare them; baselines or nap: every "
                        "prompt method with that family, so the rows differ only in the method (replicate.py's control)")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="the datasets (default: the protocol's, above); domain and cross-dataset train on the first")
    p.add_argument("--shots", nargs="+", type=int, default=SHOTS, help="few-shot: images per class")
    p.add_argument("--seeds", type=int, default=1, help="train every run with seeds 1..N")
    p.add_argument("--attack", default=ATTACK, help="evaluate.py's --attack (pgd, autoattack, ...)")
    p.add_argument("--eps", default=EPS, help="the attack's L-inf radius")
    p.add_argument("--samples", type=int, default=None,
                   help="test images per dataset, a seeded subset (default: 200 on the toy, all on real data)")
    p.add_argument("--jobs", type=int, default=2, help="trainings / evaluations at once, each with cores/jobs threads")
    p.add_argument("--out", default="runs/protocols", help="runs, evaluations and each protocol's tables")
    p.add_argument("--train-args", default="", help='extra train.py flags for every training, e.g. "--epochs 5"')
    p.add_argument("--eval-args", default="", help='extra evaluate.py flags, e.g. "--steps 20"')
    args = p.parse_args(argv)
    for flag in ("seeds", "jobs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.samples is not None and args.samples < 1:
        p.error("--samples must be >= 1")
    if min(args.shots) < 1:
        p.error("--shots must be >= 1")
    try:
        cmdline.parse_eps(args.eps)
    except ValueError as e:
        p.error(f"--eps: {e}")
    toy = args.arch == "toy"
    if args.samples is None:
        args.samples = 200 if toy else 0
    if args.datasets is None:
        args.datasets = DATASETS[args.protocol][0 if not toy else 1]
    if args.protocol in ("domain", "cross-dataset") and args.datasets is not None and len(args.datasets) < 2:
        p.error(f"{args.protocol} trains on the first of --datasets and tests on the others: give at least two")
    args.seed_list = list(range(1, args.seeds + 1))
    return args


# ---------------------------------------------------------------------- what each protocol trains and scores

def jobs(args, cross_defaults) -> list:
    """[(training, [(dataset, classes)])]: each training (a dict of train.py settings, None for zero-shot CLIP)
    with the test sets it is scored on."""
    import recipes
    datasets = args.datasets or cross_defaults
    out = []
    for method in args.methods:
        recipe = recipes.METHOD_RECIPE.get(method) if args.recipe == "own" else args.recipe
        train = lambda dataset, shots=None, classes="all": None if method == "zeroshot" else \
            {"method": method, "recipe": recipe, "dataset": dataset, "shots": shots, "classes": classes}  # noqa: E731
        if args.protocol == "base-to-new":
            out += [(train(d, classes="base"), [(d, "base"), (d, "new")]) for d in datasets]
        elif args.protocol == "few-shot":
            if method == "zeroshot":
                out.append((None, [(d, "all") for d in datasets]))
            else:
                out += [(train(d, shots=k), [(d, "all")]) for d in datasets for k in args.shots]
        else:  # domain, cross-dataset: one training on the source, every dataset scored
            out.append((train(datasets[0]), [(d, "all") for d in datasets]))
    return out


def run_name(training) -> str:
    """A training's folder name: method@recipe-dataset[-Kshot][-base|new]."""
    if training is None:
        return "zeroshot"
    shots = f"-{training['shots']}shot" if training["shots"] else ""
    classes = "" if training["classes"] == "all" else f"-{training['classes']}"
    dataset = os.path.basename(os.path.normpath(training["dataset"]))
    return f"{training['method']}@{training['recipe']}-{dataset}{shots}{classes}"


def train_command(training, folder: str, seed: int, args) -> list:
    """train.py's command for one training and seed (--recipe only when it is not the method's own)."""
    import recipes
    command = ["train.py", "--arch", args.arch, "--method", training["method"], "--dataset", training["dataset"],
               "--workers", "0", "--out", folder, "--seed", str(seed)]
    command += ["--recipe", training["recipe"]] if training["recipe"] != recipes.METHOD_RECIPE[training["method"]] else []
    command += ["--data-root", args.data_root] if args.data_root else []
    command += ["--shots", str(training["shots"])] if training["shots"] else []
    command += ["--subsample-classes", training["classes"]] if training["classes"] != "all" else []
    return command + shlex.split(args.train_args)


def eval_command(checkpoint, dataset: str, classes: str, out_json: str, args) -> list:
    """evaluate.py's command scoring one model on one test set."""
    model = ["--checkpoint", checkpoint] if checkpoint else ["--arch", args.arch, "--method", "zeroshot"]
    command = ["evaluate.py", *model, "--dataset", dataset, "--attack", args.attack, "--eps", args.eps,
               "--workers", "0", "--out", out_json]
    command += ["--data-root", args.data_root] if args.data_root else []
    command += ["--n-samples", str(args.samples), "--batch-size", str(min(args.samples, 256))] if args.samples else []
    command += ["--subsample-classes", classes] if classes != "all" else []
    return command + shlex.split(args.eval_args)


def eval_file(args, name: str, seed, dataset: str, classes: str) -> str:
    """Where one evaluation's JSON goes: named by model, seed, test set, attack, eps, subset size and extra flags."""
    import hashlib
    import replicate
    extra = "-" + hashlib.sha256(args.eval_args.encode()).hexdigest()[:8] if args.eval_args else ""
    who = name if seed is None else f"{name}-seed{seed}"
    dataset = os.path.basename(os.path.normpath(dataset))
    return os.path.join(args.out, "eval", f"{who}-{dataset}-{classes}-{args.attack}-{replicate.tag(args.eps)}"
                                          f"-n{args.samples or 'all'}{extra}.json")


def execute(args, plan: list, runner):
    """Every training of the plan, then every evaluation (replicate.py's runner: progress, ETA, reuse)."""
    import replicate
    trainings = {(run_name(t), s): t for t, _ in plan if t for s in args.seed_list}
    work = [lambda n=n, s=s, t=t: replicate.train_keyed(os.path.join(args.out, "runs", n, f"seed{s}"),
                                                        train_command(t, os.path.join(args.out, "runs", n, f"seed{s}"),
                                                                      s, args),
                                                        f"{n} seed {s}", f"{n}-seed{s}-train", args.arch, runner)
            for (n, s), t in trainings.items()]
    runner.map(work, "training")
    evaluations = {}
    for training, tests in plan:
        name = run_name(training)
        for seed in ([None] if training is None else args.seed_list):
            checkpoint = None if training is None else os.path.join(args.out, "runs", name, f"seed{seed}", "checkpoint.pt")
            for dataset, classes in tests:
                path = eval_file(args, name, seed, dataset, classes)
                label = os.path.splitext(os.path.basename(path))[0]
                evaluations[path] = (label, eval_command(checkpoint, dataset, classes, path, args))
    runner.map([lambda e=e: runner(*e) for e in evaluations.values()], "evaluation")


# ---------------------------------------------------------------------- results and tables

def score(args, training, seed, dataset: str, classes: str) -> dict:
    """{clean, robust} (%) of one evaluation, or {} when it is missing."""
    import runtime
    result = runtime.read_json(eval_file(args, run_name(training), seed, dataset, classes), {}) or {}
    r = result.get(dataset, {})
    return {k: r.get(k) for k in ("clean", "robust")} if r else {}


def harmonic(a, b):
    """The harmonic mean of two accuracies (0 when both are 0; None when one is missing)."""
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def cells(args, plan: list) -> dict:
    """{row: {column: {clean, robust: [value per seed]}}} for the table: rows are methods (few-shot: method and
    shots), columns the test sets (base-to-new: each dataset's base, new and HM)."""
    rows = {}
    for training, tests in plan:
        method = training["method"] if training else "zeroshot"
        shots = training["shots"] if training else None
        row = method + (f", {shots} shot{'s' if shots > 1 else ''}" if shots else "")
        for seed in ([None] if training is None else args.seed_list):
            for dataset, classes in tests:
                column = dataset if classes == "all" else f"{dataset} {classes}"
                got = score(args, training, seed, dataset, classes)
                for key in ("clean", "robust"):
                    rows.setdefault(row, {}).setdefault(column, {}).setdefault(key, []).append(got.get(key))
    if args.protocol == "base-to-new":
        for columns in rows.values():
            for d in (args.datasets or []):
                if f"{d} base" in columns:
                    columns[f"{d} HM"] = {k: [harmonic(b, n) for b, n in zip(columns[f"{d} base"][k], columns[f"{d} new"][k])]
                                          for k in ("clean", "robust")}
    return rows


def averaged(args, rows: dict) -> list:
    """The table's columns, with the average column(s) added to each row's cells."""
    datasets = args.datasets or []
    if args.protocol == "base-to-new":
        columns = [f"{d} {part}" for d in datasets for part in ("base", "new", "HM")]
        for cols in rows.values():
            for part in ("base", "new"):
                cols[f"average {part}"] = _mean_columns([cols.get(f"{d} {part}") for d in datasets])
            cols["average HM"] = {k: [harmonic(b, n) for b, n in zip(cols["average base"][k], cols["average new"][k])]
                                  for k in ("clean", "robust")}
        return columns + ["average base", "average new", "average HM"]
    first = next(iter(rows.values()), {})
    columns = [c for c in first] if not datasets else [d for d in datasets if d in first]
    averaged_over = columns[1:] if args.protocol in ("domain", "cross-dataset") else columns
    name = "target average" if args.protocol in ("domain", "cross-dataset") else "average"
    for cols in rows.values():
        cols[name] = _mean_columns([cols.get(c) for c in averaged_over])
    return columns + [name]


def _mean_columns(columns: list) -> dict:
    """Per seed, the mean of several columns' values (None if any is missing)."""
    out = {}
    for key in ("clean", "robust"):
        per_column = [c[key] if c else [None] for c in columns]
        n = max(len(v) for v in per_column) if per_column else 0
        seeds = [[v[i % len(v)] for v in per_column] for i in range(n)]  # zero-shot's one value pairs with every seed
        out[key] = [None if None in values else sum(values) / len(values) for values in seeds]
    return out


def cell(values: dict) -> str:
    """'clean / robust', each the mean (+- std over seeds) of its seed values; '-' where missing."""
    import stats
    parts = []
    for key in ("clean", "robust"):
        found = values.get(key, [])
        if not found or None in found:
            parts.append("-")
            continue
        mean, std = stats.mean_std(found)
        parts.append(f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else ""))
    return " / ".join(parts)


def table(args, rows: dict, columns: list) -> str:
    """The markdown table, under a line saying what it shows."""
    seeds = f"mean ± std over {args.seeds} seeds" if args.seeds > 1 else "one seed"
    n = f"{args.samples} test images per dataset" if args.samples else "every test image"
    recipe = "each method with its own source's recipe" if args.recipe == "own" else \
        f"every prompt method with the {args.recipe} recipe"
    head = (f"{args.protocol} ({args.arch}): clean / robust accuracy (%), {args.attack} at eps {args.eps}, {n}, "
            f"{seeds}; {recipe}")
    lines = [head, "", "| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(cell(cols.get(c, {})) for c in columns) + " |" for row, cols in rows.items()]
    return "\n".join(lines)


def table_folder(args) -> str:
    """Where a protocol's TABLE.md and results.json go: --out/PROTOCOL, with -recipe-NAME, -ATTACK and -epsE added
    for a --recipe, --attack or --eps other than the default, so that one protocol's tables do not overwrite
    each other."""
    import replicate
    parts = [args.protocol]
    parts += [f"recipe-{args.recipe}"] if args.recipe != "own" else []
    parts += [args.attack] if args.attack != ATTACK else []
    parts += [f"eps{replicate.tag(args.eps)}"] if args.eps != EPS else []
    return os.path.join(args.out, "-".join(parts))


def main(argv=None):
    args = parse_args(argv)
    if args.data_root and not os.path.isdir(os.path.expanduser(args.data_root)):
        cmdline.fail(f"--data-root {args.data_root}: no such folder; give the folder that holds the datasets "
                     f"(DATASETS.md)")
    import catalog
    for dataset in args.datasets or ([] if args.arch == "toy" else catalog.PAPER_EVAL):
        try:
            cmdline.check_inputs(dataset, args.data_root)
        except FileNotFoundError as e:
            cmdline.fail(str(e))
    import replicate  # loads torch
    import runtime
    import synthetic
    start = time.time()
    cross = list(synthetic.TASKS) if args.arch == "toy" else list(catalog.PAPER_EVAL)
    if args.protocol == "cross-dataset" and args.datasets is None:
        args.datasets = cross
    replicate.build_toy_first(args.arch)
    plan = jobs(args, cross)
    runner = replicate.Runner(args.out, args.jobs, args.seed_list)
    execute(args, plan, runner)
    rows = cells(args, plan)
    columns = averaged(args, rows)
    text = table(args, rows, columns)
    folder = table_folder(args)
    os.makedirs(folder, exist_ok=True)
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    results = {"protocol": args.protocol, "arch": args.arch, "datasets": args.datasets, "methods": args.methods,
               "recipe": args.recipe, "attack": args.attack, "eps": args.eps, "samples": args.samples,
               "seeds": args.seed_list,
               "columns": columns, "rows": rows, "command": f"python protocols.py {command}",
               "wall_time_s": round(time.time() - start), "timings": runner.timings}
    runtime.write_json(results, os.path.join(folder, "results.json"))
    with open(os.path.join(folder, "TABLE.md"), "w") as f:
        f.write(text + f"\n\nWall time: {results['wall_time_s']} s for `python protocols.py {command}`\n")
    print(text)
    print(f"\nwritten: {os.path.join(folder, 'TABLE.md')}, {os.path.join(folder, 'results.json')}; "
          f"runs in {args.out}/runs, evaluations in {args.out}/eval, logs in {args.out}/logs")


if __name__ == "__main__":
    cmdline.run_cli(main)
