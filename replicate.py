"""replicate.py: the paper's comparison at toy scale, offline, in one command.

    python replicate.py                                      # the comparison: about 27 min on 2 idle CPU cores
    python replicate.py --controls --ablation 4 --transfer   # the further parts, about 40 min more

It only calls train.py and evaluate.py, exactly as a user would, and draws its tables and figures
from their results. The parts:

  comparison (always, for --methods): zero-shot CLIP and every method trained on `synthetic` with its
      source's recipe (train.py's default; recipes.py), scored at each --eval-eps (1/255, the paper's
      radius, then 4/255): clean and PGD-100 accuracy on a seeded --samples subset of every synthetic
      task, AutoAttack on a seeded --aa-samples subset of the training task, and trained parameters
      counted from the checkpoint. Then the eps sweep: PGD-100 robust accuracy of every run on the
      training task at each --sweep-eps (eps 0 is the clean accuracy of the same images; below 1/255
      the PGD step is the radius itself).
  --controls: advmaple trained with NAP's recipe and nap with the baselines' recipe, scored as above.
  --ablation LAYERS: NAP at prompt depth 1..LAYERS with and without TokenRefiners, clean and PGD on
      the training task at each --eval-eps (the paper's Figures 4 and 5). At NAP's own depth these
      are the comparison's `nap` run and the `advmaple@nap` control (the same model without refiners).
  --transfer: which part of NAP costs its zero-shot transfer: NAP with refiners off, on one tower only,
      text or visual prompts only, and at smaller depths, all with NAP's recipe; clean and PGD at the
      first --eval-eps on every task.

Into --out: TABLE.md (the tables, the figures' names, the wall time), results.json (every number
the tables and figures show; `python figures.py OUT` redraws the figures from it), eps-sweep.png,
frozen-vs-finetuned.png, depth-refiners.png (--ablation), transfer.png (--transfer); a folder per
trained run, eval/ (evaluate.py's results) and logs/ (each job's output when --jobs > 1).

Runs are kept: a training is reused when its folder holds a finished run of the same train.py
command on the same backbone file (anything else is trained anew, announced); evaluate.py reuses a
result only when checkpoint, backbone, data and settings are the same. `--jobs N` runs N pipelines
(a training, then its evaluations) at once, each with cores/N threads, the costliest first.

Cost with the defaults on 2 idle cores (2 jobs of 1 thread; a toy training at NAP's recipe took
387 s on 1 thread, its evaluations 209 s, of which AutoAttack at 1/255 106 s): about 1,650 s of
training and 1,500 s of evaluation on one thread, so about 27 minutes. --controls adds about 8,
--ablation 4 about 20 and --transfer about 24 minutes alone (they share runs: all three about 40).
"""
import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import figures
import nap
import runtime
import synthetic

METHODS = ["zeroshot", "advpt", "advvpt", "advvlp", "advmaple", "nap", "tecoa", "fare"]
CONTROLS = {"advmaple@nap": ["--method", "advmaple", "--recipe", "nap"],      # NAP's recipe, no refiners
            "nap@baselines": ["--method", "nap", "--recipe", "baselines"]}   # NAP's model, the baselines' recipe
SWEEP = ["0", "0.5/255", "1/255", "2/255", "4/255"]
TASK = "synthetic"  # the training task; the others are zero-shot transfer targets
TASKS = list(synthetic.TASKS)
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------- running train.py and evaluate.py

def run(args: list, log: str = None, env: dict = None) -> float:
    """python SCRIPT ARGS (train.py or evaluate.py beside this file) in a subprocess, output to log if given,
    else to this terminal; returns its wall time (s)."""
    print(f"$ python {shlex.join(args)}" + (f"   > {log}" if log else ""), flush=True)
    start = time.time()
    command = [sys.executable, os.path.join(HERE, args[0]), *args[1:]]
    if log:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    else:
        code = subprocess.run(command, env=env).returncode
    if code:
        where = f"its output is in {log}" if log else "its message is above"
        raise runtime.RunError(f"python {shlex.join(args)} failed ({where}); fix it and run replicate.py again to resume")
    return time.time() - start


def tag(eps: str) -> str:
    """An eps as a file-name part: '1/255' -> '1_255'."""
    return eps.replace("/", "_")


def same_eps(a: str, b: str) -> bool:
    """Whether two spellings of a radius ('1/255', '0.00392156862745098') are the same number."""
    return abs(runtime.eps_arg(a) - runtime.eps_arg(b)) < 1e-12


def backbone_key(arch: str) -> dict:
    """The backbone file's identity (its SHA256), part of every training's key."""
    return runtime.backbone_record(arch)


def train_once(out: str, name: str, arch: str, flags: list, extra: list, runner) -> str:
    """Trains run `name` into out/name unless a finished run of the same command and backbone is there.

    An interrupted run of the same command resumes; a run of another command or backbone is
    replaced (announced). Returns the checkpoint's path.
    """
    folder = os.path.join(out, name)
    ckpt, marker = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "replicate.json")
    command = ["train.py", "--arch", arch, "--dataset", TASK, "--workers", "0", "--out", folder, *flags, *extra]
    key = {"command": command, "backbone": backbone_key(arch)}
    state = runtime.read_json(marker, {}) or {}
    if os.path.isfile(ckpt) and state.get("key") == key and state.get("done"):
        print(f"{name}: reusing the finished run in {folder} (same train.py command and backbone)", flush=True)
        return ckpt
    resume = []
    if os.path.isfile(ckpt) and state.get("key") == key:
        print(f"{name}: resuming the interrupted run in {folder}", flush=True)
        resume = ["--resume"]
    elif os.path.isfile(ckpt):
        old = state.get("key", {})
        why = ("its command was: python " + shlex.join(old["command"]) if old.get("command") not in (None, command)
               else "it was trained on another backbone file" if old else "it has no record of its command")
        print(f"{name}: {folder} holds another run ({why}); training anew", flush=True)
        os.remove(ckpt)
    runtime.write_json({"key": key, "done": False}, marker)
    runner(f"{name}-train", command + resume)
    key["backbone"] = backbone_key(arch)  # the first toy run builds the backbone file
    runtime.write_json({"key": key, "done": True}, marker)
    return ckpt


def model_flags(out: str, name: str, arch: str) -> list:
    """evaluate.py's flags naming the model of run `name`."""
    return ["--arch", arch, "--method", "zeroshot"] if name == "zeroshot" else \
           ["--checkpoint", os.path.join(out, name, "checkpoint.pt")]


def eval_path(out: str, name: str, attack: str, eps: str, n: int, eval_extra: list) -> str:
    """Where evaluate.py writes run `name`'s results of one attack, eps and subset size (and extra flags, by hash):
    evaluate.py refuses a results file of other settings, so each setting has its own."""
    flags = "-" + hashlib.sha256(shlex.join(eval_extra).encode()).hexdigest()[:8] if eval_extra else ""
    return os.path.join(out, "eval", f"{name}-{attack}-{tag(eps)}-n{n}{flags}.json")


def pipeline(out: str, name: str, arch: str, flags, evals: dict, train_extra: list, eval_extra: list, runner):
    """Trains run `name` (unless zero-shot or flags is None), then runs its evaluations {(attack, eps): (datasets, n)}."""
    if name != "zeroshot" and flags is not None:
        train_once(out, name, arch, flags, train_extra, runner)
    for (attack, eps), (datasets, n) in evals.items():
        done = runner.evaluated.setdefault((name, attack, eps, n), set())
        if datasets <= done:  # this call of replicate.py evaluated them already
            continue
        done |= datasets
        step = ["--alpha", eps] if runtime.eps_arg(eps) < 1 / 255 else []  # PGD's step at most the radius
        runner(f"{name}-{attack}-{tag(eps)}",
               ["evaluate.py", *model_flags(out, name, arch), "--attack", attack, "--eps", eps, *step,
                "--dataset", *[t for t in TASKS if t in datasets], "--n-samples", str(n), "--batch-size", str(n),
                "--workers", "0", "--out", eval_path(out, name, attack, eps, n, eval_extra), *eval_extra])


class Runner:
    """Runs the subprocesses of one replicate.py call, `jobs` at a time, and records their wall times."""

    def __init__(self, out: str, arch: str, jobs: int):
        self.out, self.arch, self.jobs, self.timings, self.failed = out, arch, jobs, [], False
        self.evaluated = {}  # (run, attack, eps, samples) -> the datasets evaluated by this call of replicate.py
        threads = max(1, (os.cpu_count() or 1) // jobs)
        self.env = None if jobs == 1 or "OMP_NUM_THREADS" in os.environ else \
            {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def __call__(self, label: str, args: list):
        log = os.path.join(self.out, "logs", f"{label}.log") if self.jobs > 1 else None
        seconds = run(args, log, self.env)
        self.timings.append({"job": label, "seconds": round(seconds, 1)})
        if log:
            print(f"finished {label} in {seconds:.0f} s", flush=True)

    def map(self, work: list):
        """Calls each function of work, `jobs` at a time (the first alone while the toy CLIP is not built yet)."""
        if work and self.jobs > 1 and self.arch == "toy" and not os.path.isfile(runtime.backbone_file("toy")):
            print("building the toy CLIP first (once, then cached)", flush=True)
            work[0]()
            work = work[1:]
        with ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(self.guarded, w) for w in work]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # a failure or Ctrl-C: start nothing new
                self.failed = True
                raise

    def guarded(self, work):
        """Calls work unless an earlier one failed (then nothing new starts; the running ones finish)."""
        if self.failed:
            return
        try:
            work()
        except BaseException:
            self.failed = True
            raise


def cost(flags) -> int:
    """A rough rank of a training's cost, to start the longest first: fare (PGD-10) > NAP's recipe (PGD-5) > others."""
    if not flags:
        return 0
    recipe = flags[flags.index("--recipe") + 1] if "--recipe" in flags else flags[flags.index("--method") + 1]
    return {"fare": 3, "nap": 2}.get(recipe, 1)


def run_plan(plan: dict, out: str, arch: str, train_extra: list, eval_extra: list, runner: Runner):
    """Runs each run's pipeline (training, then its evaluations), the costliest first."""
    names = sorted(plan, key=lambda n: -cost(plan[n][0]))
    runner.map([lambda n=n: pipeline(out, n, arch, plan[n][0], plan[n][1], train_extra, eval_extra, runner)
                for n in names])


def add(plan: dict, name: str, flags, attack: str, eps: str, datasets: list, n: int):
    """Adds an evaluation to run `name` of the plan, merging the datasets of the same attack and eps."""
    _, evals = plan.setdefault(name, (flags, {}))
    key = (attack, eps)
    have = evals.get(key, (set(), n))[0]
    evals[key] = (have | set(datasets), n)


# ---------------------------------------------------------------------- the parts

def run_flags(name: str):
    """train.py flags of a comparison run or control (None for zero-shot CLIP)."""
    return None if name == "zeroshot" else CONTROLS.get(name, ["--method", name])


def comparison_plan(plan: dict, names: list, eval_eps: list, sweep_eps: list, samples: int, aa_samples: int):
    """Adds the comparison's evaluations: PGD on every task and AutoAttack on the training task at each eval eps,
    PGD on the training task at each further sweep eps (eps 0 needs none: it is the clean accuracy)."""
    for name in names:
        for eps in eval_eps:
            add(plan, name, run_flags(name), "pgd", eps, TASKS, samples)
            if aa_samples:
                add(plan, name, run_flags(name), "autoattack", eps, [TASK], aa_samples)
        for eps in sweep_eps:
            if runtime.eps_arg(eps) > 0:
                add(plan, name, run_flags(name), "pgd", eps, [TASK], samples)


def ablation_run(depth: int, refiners: bool, nap_depth: int):
    """(run name, train.py flags) of NAP at this depth with or without refiners; at NAP's own depth the comparison's runs."""
    if depth == nap_depth:
        return ("nap", run_flags("nap")) if refiners else ("advmaple@nap", CONTROLS["advmaple@nap"])
    refine = "both" if refiners and depth > 1 else "none"  # refiners sit at layers 2..J: depth 1 has none
    name = f"nap-depth{depth}" + ("-norefine" if refine == "none" and depth > 1 else "")
    return name, ["--method", "nap", "--depth", str(depth), "--refine", refine]


def ablation_rows(layers: int, nap_depth: int) -> list:
    """[{depth, refiners, run, flags}]: depth 1..layers, with and without refiners (depth 1 has none: they sit at 2..J)."""
    rows = []
    for depth in range(1, layers + 1):
        for refiners in ([False] if depth == 1 else [False, True]):
            name, flags = ablation_run(depth, refiners, nap_depth)
            rows.append({"depth": depth, "refiners": refiners, "run": name, "flags": flags})
    return rows


def transfer_rows(nap_depth: int, n_ctx: int) -> list:
    """[{variant, run, flags}] of the transfer investigation; every trained variant uses NAP's recipe."""
    d, n = str(nap_depth), str(n_ctx)
    rows = [("zero-shot CLIP", "zeroshot", None),
            (f"NAP: text + visual prompts at layers 1-{d}, refiners on both towers", "nap", run_flags("nap")),
            ("no refiners (advmaple's model)", "advmaple@nap", CONTROLS["advmaple@nap"]),
            ("refiners on the image tower only", "nap-refine-vision", ["--method", "nap", "--refine", "vision"]),
            ("refiners on the text tower only", "nap-refine-text", ["--method", "nap", "--refine", "text"]),
            (f"text prompts only (layers 1-{d}, no refiners)", "nap-text-only",
             ["--method", "advpt", "--recipe", "nap", "--depth", d, "--n-ctx", n]),
            (f"visual prompts only (layers 1-{d}, no refiners)", "nap-vision-only",
             ["--method", "advvpt", "--recipe", "nap", "--depth", d, "--n-ctx", n])]
    for depth in range(nap_depth - 1, 0, -1):
        name, flags = ablation_run(depth, True, nap_depth)
        rows.append((f"depth {depth}" + (", refiners at layer 2" if depth == 2 else " (no refiners)" if depth == 1
                                          else f", refiners at layers 2-{depth}"), name, flags))
    return [{"variant": v, "run": r, "flags": f} for v, r, f in rows]


def nap_config(out: str) -> dict:
    """The comparison's NAP run's config (its depth and context length set the ablation's and transfer's runs)."""
    return nap.load_checkpoint(os.path.join(out, "nap", "checkpoint.pt"))["config"]


# ---------------------------------------------------------------------- results, tables

def params(out: str, name: str):
    """Trained parameters of a run: the sizes of its checkpoint's trainable tensors (0 for zero-shot CLIP)."""
    if name == "zeroshot":
        return 0
    path = os.path.join(out, name, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    return sum(t.numel() for t in nap.load_checkpoint(path)["trainable"].values())


def read_run(out: str, name: str, eps_list: list, args) -> dict:
    """{params, pgd: {eps: {task: {clean, robust, n_samples, steps}}}, autoattack: {...}} from evaluate.py's JSONs."""
    keep = ("clean", "robust", "n_samples", "steps")
    run = {"params": params(out, name)}
    for attack, n in (("pgd", args.samples), ("autoattack", args.aa_samples)):
        run[attack] = {}
        for eps in eps_list if n else []:
            found = runtime.read_json(eval_path(out, name, attack, eps, n, shlex.split(args.eval_args)), {}) or {}
            if found:
                run[attack][eps] = {t: {k: r.get(k) for k in keep} for t, r in found.items()}
    return run


def collect(out: str, args, parts: dict) -> dict:
    """Everything the tables and figures show, from the evaluation JSONs and checkpoints: results.json's contents."""
    names = list(dict.fromkeys(parts["comparison"] + [r["run"] for r in parts["ablation"] + parts["transfer"]]))
    eps_list = list(dict.fromkeys(args.eval_eps + [e for e in args.sweep_eps if runtime.eps_arg(e) > 0]))
    runs = {name: read_run(out, name, eps_list, args) for name in names}
    sweep = {}
    for name in parts["comparison"]:
        pgd = runs[name]["pgd"]
        clean = pgd.get(args.eval_eps[0], {}).get(TASK, {}).get("clean")
        sweep[name] = {e: clean if runtime.eps_arg(e) == 0 else pgd.get(e, {}).get(TASK, {}).get("robust")
                       for e in args.sweep_eps}
    steps = next((r["steps"] for run in runs.values() for by_task in run["pgd"].values() for r in by_task.values()), 100)
    return {"arch": args.arch, "training_task": TASK, "tasks": TASKS, "eval_eps": args.eval_eps,
            "sweep_eps": args.sweep_eps, "samples": args.samples, "aa_samples": args.aa_samples, "steps": steps,
            "comparison": parts["comparison"], "controls": [n for n in parts["comparison"] if n in CONTROLS],
            "runs": runs, "sweep": sweep,
            "ablation": [{k: r[k] for k in ("depth", "refiners", "run")} for r in parts["ablation"]],
            "transfer": [{k: r[k] for k in ("variant", "run")} for r in parts["transfer"]]}


def num(v) -> str:
    """A percentage as a table cell: one decimal, '-' when missing."""
    return "-" if v is None else f"{v:.1f}"


def pair(results: dict, run: str, attack: str, eps: str, task: str) -> str:
    """'clean / robust' of one run, attack, eps and task ('- / -' where not evaluated)."""
    r = results["runs"][run].get(attack, {}).get(eps, {}).get(task, {})
    return f"{num(r.get('clean'))} / {num(r.get('robust'))}"


def mean_pair(results: dict, run: str, eps: str, tasks: list) -> str:
    """'clean / robust' PGD averages over tasks ('-' unless every task was evaluated)."""
    by_task = results["runs"][run]["pgd"].get(eps, {})
    means = [sum(by_task[t][k] for t in tasks) / len(tasks) if all(by_task.get(t, {}).get(k) is not None for t in tasks)
             else None for k in ("clean", "robust")]
    return " / ".join(num(m) for m in means)


def count(n) -> str:
    """A parameter count as a table cell: thousands separated, '-' when missing."""
    return "-" if n is None else f"{n:,}"


def comparison_table(results: dict, eps: str) -> str:
    """Markdown at one eps: per run its trained parameters, clean / PGD per task, clean / AutoAttack on the
    training task, and the averages."""
    tasks = results["tasks"]
    header = ["run", "trained parameters", f"{TASK} clean / PGD", f"{TASK} clean / AutoAttack",
              *[f"{t} clean / PGD" for t in tasks[1:]], "average clean / PGD"]
    lines = [f"Comparison at eps {eps}: PGD-{results['steps']} on {results['samples']} images of every task, AutoAttack "
             f"on {results['aa_samples']} images of {TASK} (accuracy, %; runs named method@recipe are the controls):", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for run in results["comparison"]:
        cells = [count(results["runs"][run]["params"]), pair(results, run, "pgd", eps, TASK),
                 pair(results, run, "autoattack", eps, TASK), *[pair(results, run, "pgd", eps, t) for t in tasks[1:]],
                 mean_pair(results, run, eps, tasks)]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """Markdown: PGD robust accuracy on the training task at every sweep eps (eps 0: clean accuracy)."""
    eps = results["sweep_eps"]
    lines = [f"Robust accuracy (%) vs eps: PGD-{results['steps']} on {results['samples']} images of {TASK} "
             f"(eps 0 is the clean accuracy of the same images):", "",
             "| run | " + " | ".join(f"eps {e}" for e in eps) + " |", "|---|" + "---:|" * len(eps)]
    for run, points in results["sweep"].items():
        lines.append(f"| {run} | " + " | ".join(num(points.get(e)) for e in eps) + " |")
    return "\n".join(lines)


def ablation_table(results: dict) -> str:
    """Markdown: NAP by prompt depth, with and without TokenRefiners, clean / PGD on the training task at each eval eps."""
    eps = results["eval_eps"]
    lines = [f"NAP on {TASK} by prompt depth J, with and without TokenRefiners (clean / PGD-{results['steps']} "
             f"accuracy, %, {results['samples']} images):", "",
             "| depth J | refiners | run | " + " | ".join(f"eps {e} clean / PGD" for e in eps) + " |",
             "|---|---|---|" + "---:|" * len(eps)]
    for r in results["ablation"]:
        lines.append(f"| {r['depth']} | {'yes' if r['refiners'] else 'no'} | {r['run']} | " +
                     " | ".join(pair(results, r["run"], "pgd", e, TASK) for e in eps) + " |")
    return "\n".join(lines)


def transfer_table(results: dict) -> str:
    """Markdown: each NAP variant's clean / PGD accuracy on every task at the first eval eps, and the transfer average."""
    eps, tasks = results["eval_eps"][0], results["tasks"]
    header = ["variant", "run", "trained parameters", *[f"{t} clean / PGD" for t in tasks], "transfer average clean / PGD"]
    lines = [f"Transfer investigation: NAP's parts, each trained on {TASK} with NAP's recipe, scored zero-shot on every "
             f"task (clean / PGD-{results['steps']} accuracy at eps {eps}, %, {results['samples']} images per task):", "",
             "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for r in results["transfer"]:
        cells = [count(results["runs"][r["run"]]["params"]), *[pair(results, r["run"], "pgd", eps, t) for t in tasks],
                 mean_pair(results, r["run"], eps, tasks[1:])]
        lines.append(f"| {r['variant']} | {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict) -> str:
    """TABLE.md: every table of the parts that ran."""
    parts = [comparison_table(results, e) for e in results["eval_eps"]] if results["comparison"] else []
    parts += [sweep_table(results)] if results["sweep"] else []
    parts += [ablation_table(results)] if results["ablation"] else []
    parts += [transfer_table(results)] if results["transfer"] else []
    return "\n\n".join(parts)


# ---------------------------------------------------------------------- main

def parse_args(argv=None):
    p = runtime.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/replication", help="runs, results, TABLE.md and the figures")
    p.add_argument("--arch", default="toy", help="the backbone (toy, or a weights file)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="the comparison's methods")
    p.add_argument("--controls", action="store_true", help="also advmaple with NAP's recipe and nap with the baselines'")
    p.add_argument("--ablation", type=int, default=0, metavar="LAYERS",
                   help="also NAP at depth 1..LAYERS with and without refiners (4 for the toy)")
    p.add_argument("--transfer", action="store_true", help="also the transfer investigation (NAP's parts, one at a time)")
    p.add_argument("--eval-eps", nargs="+", default=["1/255", "4/255"], help="evaluation radii; the first is the main one")
    p.add_argument("--sweep-eps", nargs="+", default=SWEEP, help="radii of the eps sweep on the training task")
    p.add_argument("--samples", type=int, default=200, help="PGD on a seeded subset of this size per task")
    p.add_argument("--aa-samples", type=int, default=50, help="AutoAttack on a seeded subset of the training task (0: none)")
    p.add_argument("--jobs", type=int, default=2, help="trainings / evaluations at once, each with cores/jobs threads")
    p.add_argument("--train-args", default="", help="extra train.py flags for every training, e.g. \"--epochs 50\" "
                                                    "(after each run's own flags, so they win)")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. \"--steps 20\"")
    args = p.parse_args(argv)
    for flag in ("eval_eps", "sweep_eps"):  # a bad radius fails here, not after the training
        for eps in getattr(args, flag):
            try:
                runtime.eps_arg(eps)
            except argparse.ArgumentTypeError as e:
                p.error(f"--{flag.replace('_', '-')}: {e}")
    # a sweep radius equal to an evaluation radius reads that evaluation: spell it the same way
    args.sweep_eps = [next((e for e in args.eval_eps if same_eps(e, s)), s) for s in args.sweep_eps]
    for flag, low in (("samples", 1), ("aa_samples", 0), ("jobs", 1), ("ablation", 0)):
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out, arch = args.out, args.arch
    train_extra, eval_extra = shlex.split(args.train_args), shlex.split(args.eval_args)
    runner = Runner(out, arch, args.jobs)
    names = list(args.methods) + (list(CONTROLS) if args.controls else [])
    plan = {}
    comparison_plan(plan, names, args.eval_eps, args.sweep_eps, args.samples, args.aa_samples)
    if (args.ablation or args.transfer) and "nap" not in plan:
        plan["nap"] = (run_flags("nap"), {})  # the later parts take NAP's depth from its checkpoint
    run_plan(plan, out, arch, train_extra, eval_extra, runner)

    parts = {"comparison": names, "ablation": [], "transfer": []}
    if args.ablation or args.transfer:
        cfg = nap_config(out)
        parts["ablation"] = ablation_rows(args.ablation, cfg["depth"]) if args.ablation else []
        parts["transfer"] = transfer_rows(cfg["depth"], cfg["text_ctx"]) if args.transfer else []
        plan = {}
        for r in parts["ablation"]:
            for eps in args.eval_eps:
                add(plan, r["run"], r["flags"], "pgd", eps, [TASK], args.samples)
        for r in parts["transfer"]:
            add(plan, r["run"], r["flags"], "pgd", args.eval_eps[0], TASKS, args.samples)
        run_plan(plan, out, arch, train_extra, eval_extra, runner)

    results = collect(out, args, parts)
    results["wall_time_s"] = round(time.time() - start)
    results["timings"] = runner.timings
    pngs = figures.write_all(results, out)
    text = report(results)
    text += ("\n\nFigures: " + ", ".join(os.path.basename(p) for p in pngs)) if pngs else ""
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    text += (f"\n\nWall time: {results['wall_time_s']} s for `python replicate.py {command}` "
             f"({len(runner.timings)} train.py / evaluate.py calls, {args.jobs} at a time; finished work reused)")
    runtime.write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "TABLE.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wall time {results['wall_time_s']} s")


if __name__ == "__main__":
    runtime.run_cli(main)
