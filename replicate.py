"""replicate.py: the paper's comparison at toy scale, controlled and repeated, offline, in one command.

    python replicate.py                                    # the controlled comparison, one seed
    python replicate.py --seeds 3                          # every training repeated with seeds 1, 2, 3
    python replicate.py --ablation 4 --transfer            # the further parts (they reuse the comparison's runs)

It only calls train.py and evaluate.py, exactly as a user would, and draws its tables and figures
from their results. Runs are named `variant@recipe`: the model (a method of nap.PRESETS, or a NAP
variant below) and the recipe family it trains with (recipes.py). The parts:

  comparison (always): zero-shot CLIP, TeCoA and FARE with their own recipes, and every prompt
      method (advpt, advvpt, advvlp, advmaple, nap) with EACH recipe family (--recipes: the
      baselines' [B] and NAP's [D]), plus NAP without its TokenRefiners (`nap-norefine`, its
      ablation), so that NAP meets the same prompts without refiners and AdvMaPLe as its source
      configures it at the same recipe. Each trained with every seed of --seeds. Scored at each
      --eval-eps: clean and PGD-100 accuracy on a seeded --samples subset of every synthetic task,
      AutoAttack on the same images of the training task (--aa-samples, by default --samples),
      and trained parameters counted from the checkpoint. Then the eps sweep of each method with
      its own recipe: PGD on the training task at each --sweep-eps (eps 0 is the clean accuracy).
  --ablation LAYERS: NAP at prompt depth 1..LAYERS with and without TokenRefiners, NAP's recipe,
      clean and PGD on the training task at each --eval-eps (the paper's Figures 4 and 5).
  --transfer: which part of NAP costs its zero-shot transfer: refiners off, starting as the
      identity (--refiner-init zero), on the image tower ([D]), on both towers or the text tower
      only (a reading of [P]) under both recipes; clean and PGD at the first --eval-eps on every task.

Every evaluation uses the same seeded images and attack seeds, so two runs are compared image by
image (an exact McNemar test, stats.py). Tables give, per accuracy, its 95% Wilson interval (one
seed) or the mean +- std over seeds; the paired comparisons say which differences are beyond noise.

Into --out: TABLE.md (the tables, the paired tests, the figures' names, the wall time), results.json
(every number the tables and figures show; `python figures.py OUT` redraws the figures from it),
eps-sweep.png, frozen-vs-finetuned.png, depth-refiners.png (--ablation), transfer.png (--transfer); a
folder per trained run and seed (RUN/seedS), eval/ (evaluate.py's results) and logs/ (each job's output).

Runs are kept: a training is reused when its folder holds a finished run of the same train.py
command on the same backbone file (anything else is trained anew, announced; an interrupted one
resumes); evaluate.py reuses a result only when checkpoint, backbone, data and settings are the same.
The toy CLIP is built first, in the foreground, with its progress bar. `--jobs N` runs N trainings
or evaluations at once, each with cores/N threads, the costliest first.
"""
import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cmdline
import recipes

PROMPT_METHODS = ["advpt", "advvpt", "advvlp", "advmaple", "nap"]
METHODS = ["zeroshot", *PROMPT_METHODS, "tecoa", "fare"]
FAMILIES = ["baselines", "nap"]  # the prompt-tuning recipe families of recipes.py
VARIANTS = {  # NAP variants: train.py flags besides --recipe
    "nap-norefine": ["--method", "nap", "--refine", "none"],           # NAP's prompts without TokenRefiners
    "nap-zeroinit": ["--method", "nap", "--refiner-init", "zero"],     # refiners start as the identity
    "nap-both": ["--method", "nap", "--refine", "both"],               # image + text (SOS) refiners, a reading of [P]
    "nap-text": ["--method", "nap", "--refine", "text"],               # text (SOS) refiners only
}
SWEEP = ["0", "0.5/255", "1/255", "2/255", "4/255"]
TASK = "synthetic"  # the training task; the others are zero-shot transfer targets
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------- flags, checked before torch loads

def parse_args(argv=None):
    p = cmdline.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/replication", help="runs, results, TABLE.md and the figures")
    p.add_argument("--arch", default="toy", help="the backbone (toy, or a weights file)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="the comparison's methods")
    p.add_argument("--recipes", nargs="+", default=FAMILIES, choices=FAMILIES,
                   help="the recipe families every prompt method trains with")
    p.add_argument("--seeds", type=int, default=1, help="train every run with seeds 1..N")
    p.add_argument("--ablation", type=int, default=0, metavar="LAYERS",
                   help="also NAP at depth 1..LAYERS with and without refiners (4 for the toy)")
    p.add_argument("--transfer", action="store_true", help="also the transfer investigation (NAP's parts, one at a time)")
    p.add_argument("--eval-eps", nargs="+", default=["1/255", "4/255"], help="evaluation radii; the first is the main one")
    p.add_argument("--sweep-eps", nargs="+", default=SWEEP, help="radii of the eps sweep on the training task")
    p.add_argument("--samples", type=int, default=200, help="PGD on a seeded subset of this size per task")
    p.add_argument("--aa-samples", type=int, default=None,
                   help="AutoAttack on a seeded subset of the training task (default: --samples, the same images; 0: none)")
    p.add_argument("--jobs", type=int, default=2, help="trainings / evaluations at once, each with cores/jobs threads")
    p.add_argument("--train-args", default="", help="extra train.py flags for every training, e.g. \"--epochs 50\" "
                                                    "(after each run's own flags, so they win)")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. \"--steps 20\"")
    args = p.parse_args(argv)
    args.aa_samples = args.samples if args.aa_samples is None else args.aa_samples
    for flag, low in (("samples", 1), ("aa_samples", 0), ("jobs", 1), ("ablation", 0), ("seeds", 1)):
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}")
    cmdline.check_inputs(arch=args.arch)
    cmdline.check_writable(args.out, folder=True)
    for flag in ("eval_eps", "sweep_eps"):  # a bad radius fails here, not after the training (reading one loads torch)
        for eps in getattr(args, flag):
            try:
                cmdline.eps_arg(eps)
            except argparse.ArgumentTypeError as e:
                p.error(f"--{flag.replace('_', '-')}: {e}")
    # a sweep radius equal to an evaluation radius reads that evaluation: spell it the same way
    args.sweep_eps = [next((e for e in args.eval_eps if same_eps(e, s)), s) for s in args.sweep_eps]
    args.seed_list = list(range(1, args.seeds + 1))
    return args


def same_eps(a: str, b: str) -> bool:
    """Whether two spellings of a radius ('1/255', '0.00392156862745098') are the same number."""
    return abs(cmdline.eps_arg(a) - cmdline.eps_arg(b)) < 1e-12


if __name__ == "__main__":  # a bad flag, --arch or --out is refused here, before torch loads (which takes seconds)
    cmdline.run_cli(parse_args)

import figures  # noqa: E402  (the heavy imports follow the checks above)
import nap  # noqa: E402
import runtime  # noqa: E402
import stats  # noqa: E402
import synthetic  # noqa: E402

TASKS = list(synthetic.TASKS)


# ---------------------------------------------------------------------- runs: names, flags, folders

def own_run(method: str) -> str:
    """The run of a method with its own source's recipe: 'nap' -> 'nap@nap', 'advpt' -> 'advpt@baselines'."""
    return f"{method}@{recipes.METHOD_RECIPE[method]}" if method in PROMPT_METHODS else method


def run_flags(run: str):
    """train.py flags of a run named variant@recipe, or a method (zeroshot: None, nothing to train)."""
    if run == "zeroshot":
        return None
    if "@" not in run:
        return ["--method", run]
    variant, _, family = run.partition("@")
    depth = re.fullmatch(r"nap-depth(\d+)(-norefine)?", variant)
    if variant in PROMPT_METHODS:
        flags = ["--method", variant]
    elif variant in VARIANTS:
        flags = list(VARIANTS[variant])
    elif depth:
        flags = ["--method", "nap", "--depth", depth.group(1), "--refine", "none" if depth.group(2) else "vision"]
    else:
        raise ValueError(f"unknown run {run!r}")
    return flags + ["--recipe", family]


def run_folder(out: str, run: str, seed: int) -> str:
    return os.path.join(out, run, f"seed{seed}")


def seeds_of(run: str, seeds: list) -> list:
    """Zero-shot CLIP has no training seed: one result."""
    return [None] if run == "zeroshot" else list(seeds)


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


def train_once(out: str, run_name: str, seed: int, arch: str, extra: list, runner) -> str:
    """Trains run_name with this seed into out/RUN/seedS (train_keyed)."""
    folder = run_folder(out, run_name, seed)
    command = ["train.py", "--arch", arch, "--dataset", TASK, "--workers", "0", "--out", folder,
               *run_flags(run_name), "--seed", str(seed), *extra]
    return train_keyed(folder, command, f"{run_name} seed {seed}", f"{run_name}-seed{seed}-train", arch, runner)


def train_keyed(folder: str, command: list, label: str, job: str, arch: str, runner) -> str:
    """Runs a train.py command into folder unless a finished run of the same command and backbone is there.
    An interrupted run of the same command resumes; another command's run is replaced (announced)."""
    ckpt, marker = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "replicate.json")
    key = {"command": command, "backbone": runtime.backbone_record(arch)}
    state = runtime.read_json(marker, {}) or {}
    if os.path.isfile(ckpt) and state.get("key") == key and state.get("done"):
        print(f"{label}: reusing the finished run in {folder} (same train.py command and backbone)", flush=True)
        return ckpt
    resume = []
    if os.path.isfile(ckpt) and state.get("key") == key:
        print(f"{label}: resuming the interrupted run in {folder}", flush=True)
        resume = ["--resume"]
    elif os.path.isfile(ckpt):
        old = state.get("key", {})
        why = ("its command was: python " + shlex.join(old["command"]) if old.get("command") not in (None, command)
               else "it was trained on another backbone file" if old else "it has no record of its command")
        print(f"{label}: {folder} holds another run ({why}); training anew", flush=True)
        os.remove(ckpt)
    runtime.write_json({"key": key, "done": False}, marker)
    runner(job, command + resume)
    runtime.write_json({"key": key, "done": True}, marker)
    return ckpt


def model_flags(out: str, run_name: str, seed, arch: str) -> list:
    """evaluate.py's flags naming the model of one run and seed."""
    return ["--arch", arch, "--method", "zeroshot"] if run_name == "zeroshot" else \
           ["--checkpoint", os.path.join(run_folder(out, run_name, seed), "checkpoint.pt")]


def eval_path(out: str, run_name: str, seed, attack: str, eps: str, n: int, eval_extra: list) -> str:
    """Where evaluate.py writes one run's results of one seed, attack, eps and subset size (and extra flags, by hash):
    evaluate.py refuses a results file of other settings, so each setting has its own."""
    flags = "-" + hashlib.sha256(shlex.join(eval_extra).encode()).hexdigest()[:8] if eval_extra else ""
    who = run_name if seed is None else f"{run_name}-seed{seed}"
    return os.path.join(out, "eval", f"{who}-{attack}-{tag(eps)}-n{n}{flags}.json")


class Runner:
    """Runs the subprocesses of one replicate.py call, `jobs` at a time; records wall times and shows progress."""

    def __init__(self, out: str, jobs: int, seeds: list):
        self.out, self.jobs, self.seeds, self.timings, self.failed = out, jobs, seeds, [], False
        self.start, self.done, self.total = time.time(), 0, 0
        threads = max(1, (os.cpu_count() or 1) // jobs)
        self.env = None if jobs == 1 or "OMP_NUM_THREADS" in os.environ else \
            {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def __call__(self, label: str, args: list):
        log = os.path.join(self.out, "logs", f"{label}.log")
        seconds = run(args, log, self.env)
        self.timings.append({"job": label, "seconds": round(seconds, 1)})
        print(f"finished {label} in {seconds:.0f} s (its output: {log})", flush=True)

    def map(self, work: list, what: str):
        """Calls each function of work, `jobs` at a time, printing 'job k of n, elapsed, ETA' as each ends."""
        self.done, self.total, start = 0, len(work), time.time()
        if work:
            print(f"{what}: {len(work)} jobs, {self.jobs} at a time", flush=True)
        with ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(self.guarded, w, start) for w in work]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # a failure or Ctrl-C: start nothing new
                self.failed = True
                raise

    def guarded(self, work, start: float):
        """Calls work unless an earlier one failed (then nothing new starts; the running ones finish)."""
        if self.failed:
            return
        try:
            work()
        except BaseException:
            self.failed = True
            raise
        self.done += 1
        spent = time.time() - start
        eta = spent / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] elapsed {spent / 60:.1f} min, about {eta / 60:.0f} min left "
              f"(whole run {(time.time() - self.start) / 60:.1f} min)", flush=True)


def cost(run_name: str) -> int:
    """A rough rank of a training's cost, to start the longest first: fare (PGD-10) > NAP's recipe (PGD-5) > others."""
    flags = run_flags(run_name) or []
    recipe = flags[flags.index("--recipe") + 1] if "--recipe" in flags else (flags[1] if flags else "")
    return {"fare": 3, "nap": 2}.get(recipe, 1)


def build_toy_first(arch: str):
    """Builds the toy CLIP in the foreground (its progress bar on this terminal) before any job needs it."""
    if arch == "toy" and not os.path.isfile(runtime.backbone_file("toy")):
        print("building the toy CLIP first (once, then cached; about 7 minutes on 2 idle cores)", flush=True)
        run(["toyclip.py"])


def execute(plan: dict, out: str, arch: str, train_extra: list, eval_extra: list, runner: Runner):
    """Every training of the plan, then every evaluation: plan {run: {(attack, eps): (datasets, n)}}."""
    trainings = sorted({(r, s) for r in plan for s in runner.seeds if r != "zeroshot"}, key=lambda rs: -cost(rs[0]))
    runner.map([lambda r=r, s=s: train_once(out, r, s, arch, train_extra, runner) for r, s in trainings], "training")
    evaluations = []
    for r, evals in plan.items():
        for seed in seeds_of(r, runner.seeds):
            for (attack, eps), (datasets, n) in evals.items():
                step = ["--alpha", eps] if runtime.eps_arg(eps) < 1 / 255 else []  # PGD's step at most the radius
                label = f"{r}" + (f"-seed{seed}" if seed else "") + f"-{attack}-{tag(eps)}"
                evaluations.append((label, ["evaluate.py", *model_flags(out, r, seed, arch), "--attack", attack,
                                            "--eps", eps, *step, "--dataset", *[t for t in TASKS if t in datasets],
                                            "--n-samples", str(n), "--batch-size", str(n), "--workers", "0",
                                            "--out", eval_path(out, r, seed, attack, eps, n, eval_extra), *eval_extra]))
    evaluations.sort(key=lambda e: e[1][e[1].index("--attack") + 1] == "autoattack")  # every PGD table fills first
    runner.map([lambda e=e: runner(*e) for e in evaluations], "evaluation")


def add(plan: dict, run_name: str, attack: str, eps: str, datasets: list, n: int):
    """Adds an evaluation to a run of the plan, merging the datasets of the same attack and eps."""
    evals = plan.setdefault(run_name, {})
    have = evals.get((attack, eps), (set(), n))[0]
    evals[(attack, eps)] = (have | set(datasets), n)


# ---------------------------------------------------------------------- the parts

def comparison_runs(methods: list, families: list) -> list:
    """zeroshot, each prompt method (and nap-norefine with nap) under each recipe family, then tecoa and fare."""
    runs = ["zeroshot"] if "zeroshot" in methods else []
    for m in PROMPT_METHODS + ["nap-norefine"]:
        if m in methods or (m == "nap-norefine" and "nap" in methods):
            runs += [f"{m}@{f}" for f in families]
    return runs + [m for m in ("tecoa", "fare") if m in methods]


def comparison_plan(plan: dict, runs: list, methods: list, args):
    """PGD on every task and AutoAttack on the training task at each eval eps; the sweep for each method's own run."""
    for r in runs:
        for eps in args.eval_eps:
            add(plan, r, "pgd", eps, TASKS, args.samples)
            if args.aa_samples:
                add(plan, r, "autoattack", eps, [TASK], args.aa_samples)
    for m in methods:
        if own_run(m) in runs:
            for eps in args.sweep_eps:
                if runtime.eps_arg(eps) > 0:
                    add(plan, own_run(m), "pgd", eps, [TASK], args.samples)


def ablation_rows(layers: int, nap_depth: int) -> list:
    """[{depth, refiners, run}]: NAP at depth 1..layers with NAP's recipe, with and without refiners (depth 1 has
    none: they sit at layers 2..J); at NAP's own depth the comparison's nap@nap and nap-norefine@nap."""
    rows = []
    for depth in range(1, layers + 1):
        for refiners in ([False] if depth == 1 else [False, True]):
            if depth == nap_depth:
                name = "nap@nap" if refiners else "nap-norefine@nap"
            else:
                name = f"nap-depth{depth}" + ("" if refiners else "-norefine") + "@nap"
            rows.append({"depth": depth, "refiners": refiners, "run": name})
    return rows


def transfer_rows() -> list:
    """[{variant, run}] of the transfer investigation."""
    rows = [("zero-shot CLIP", "zeroshot")]
    for family, recipe in (("nap", "NAP's recipe"), ("baselines", "the baselines' recipe")):
        rows += [(f"NAP: refiners on the image tower ([D]), {recipe}", f"nap@{family}"),
                 (f"no refiners, {recipe}", f"nap-norefine@{family}"),
                 (f"refiners on both towers (text: SOS), {recipe}", f"nap-both@{family}"),
                 (f"refiners on the text tower only (SOS), {recipe}", f"nap-text@{family}"),
                 (f"AdvMaPLe as its source configures it, {recipe}", f"advmaple@{family}")]
    rows.insert(3, ("refiners start as the identity (--refiner-init zero), NAP's recipe", "nap-zeroinit@nap"))
    return [{"variant": v, "run": r} for v, r in rows]


def nap_depth(out: str, seed: int) -> int:
    """The depth J of the comparison's nap@nap run (its preset's depth scaled to the backbone)."""
    return nap.load_checkpoint(os.path.join(run_folder(out, "nap@nap", seed), "checkpoint.pt"))["config"]["depth"]


# ---------------------------------------------------------------------- results

def params(out: str, run_name: str, seed) -> int:
    """Trained parameters of a run: the sizes of its checkpoint's trainable tensors (0 for zero-shot CLIP)."""
    if run_name == "zeroshot":
        return 0
    path = os.path.join(run_folder(out, run_name, seed), "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    return sum(t.numel() for t in nap.load_checkpoint(path)["trainable"].values())


KEEP = ("clean", "robust", "n_samples", "steps", "images")  # images: which were right, for the paired tests


def read_seed(out: str, run_name: str, seed, eps_list: list, args) -> dict:
    """{pgd: {eps: {task: {clean, robust, n_samples, steps, images, contents}}}, autoattack: {...}} of one run and seed."""
    found = {}
    for attack, n in (("pgd", args.samples), ("autoattack", args.aa_samples)):
        found[attack] = {}
        for eps in eps_list if n else []:
            res = runtime.read_json(eval_path(out, run_name, seed, attack, eps, n, shlex.split(args.eval_args)), {})
            if res:
                found[attack][eps] = {t: {**{k: r[k] for k in KEEP if k in r},
                                          "contents": {"data": (r.get("contents") or {}).get("data")}}
                                      for t, r in res.items()}
    return found


def summarise(per_seed: dict) -> dict:
    """Seed results -> {attack: {eps: {task: {clean, robust (means), clean_std, robust_std, n_seeds, n_samples}}}}."""
    out = {}
    for seed_result in per_seed.values():
        for attack, by_eps in seed_result.items():
            for eps, by_task in by_eps.items():
                for task, r in by_task.items():
                    slot = out.setdefault(attack, {}).setdefault(eps, {}).setdefault(task, {"values": []})
                    slot["values"].append(r)
    for by_eps in out.values():
        for by_task in by_eps.values():
            for task, slot in by_task.items():
                values = slot.pop("values")
                for key in ("clean", "robust"):
                    found = [v[key] for v in values if v.get(key) is not None]
                    mean, std = stats.mean_std(found) if found else (None, None)
                    slot[key], slot[f"{key}_std"] = mean, std
                slot["n_seeds"], slot["n_samples"] = len(values), values[0].get("n_samples")
    return out


def collect(out: str, args, parts: dict) -> dict:
    """Everything the tables and figures show, from the evaluation JSONs and checkpoints: results.json's contents."""
    names = list(dict.fromkeys(parts["comparison"] + [r["run"] for r in parts["ablation"] + parts["transfer"]]))
    eps_list = list(dict.fromkeys(args.eval_eps + [e for e in args.sweep_eps if runtime.eps_arg(e) > 0]))
    runs = {}
    for name in names:
        per_seed = {str(s): read_seed(out, name, s, eps_list, args) for s in seeds_of(name, args.seed_list)}
        first = seeds_of(name, args.seed_list)[0]
        runs[name] = {"params": params(out, name, first), **summarise(per_seed), "seeds": per_seed}
    sweep = {}
    for m in parts["methods"]:
        name = own_run(m)
        if name in runs:
            pgd = runs[name].get("pgd", {})
            clean = pgd.get(args.eval_eps[0], {}).get(TASK, {}).get("clean")
            sweep[name] = {e: clean if runtime.eps_arg(e) == 0 else pgd.get(e, {}).get(TASK, {}).get("robust")
                           for e in args.sweep_eps}
    results = {"arch": args.arch, "training_task": TASK, "tasks": TASKS, "eval_eps": args.eval_eps,
               "sweep_eps": args.sweep_eps, "samples": args.samples, "aa_samples": args.aa_samples, "steps": 100,
               "seeds": args.seed_list, "comparison": parts["comparison"],
               "own": {m: own_run(m) for m in parts["methods"]}, "runs": runs, "sweep": sweep,
               "ablation": parts["ablation"], "transfer": parts["transfer"]}
    results["paired"] = paired_tests(results)
    return results


def paired_pairs(results: dict) -> list:
    """(a, b, what) pairs the text compares: refiners, NAP vs AdvMaPLe and recipes, each at the same recipe."""
    runs, pairs = results["runs"], []
    for f in FAMILIES:
        pairs += [(f"nap@{f}", f"nap-norefine@{f}", f"TokenRefiners, {f} recipe"),
                  (f"nap@{f}", f"advmaple@{f}", f"NAP vs AdvMaPLe as its source configures it, {f} recipe")]
    pairs += [("nap@nap", "nap@baselines", "recipe, NAP's model"), ("advmaple@nap", "advmaple@baselines",
                                                                     "recipe, AdvMaPLe's model")]
    pairs += [("nap@nap", other, "NAP (own recipe) vs another method (own recipe)")
              for other in ("advpt@baselines", "advvpt@baselines", "advvlp@baselines", "advmaple@baselines",
                            "tecoa", "fare", "zeroshot")]
    return [(a, b, what) for a, b, what in pairs if a in runs and b in runs]


def paired_tests(results: dict) -> list:
    """Exact McNemar tests per seed, on the training task at the first eval eps, for clean, PGD and AutoAttack."""
    eps, rows = results["eval_eps"][0], []
    for a, b, what in paired_pairs(results):
        for attack, key in (("pgd", "clean"), ("pgd", "robust"), ("autoattack", "robust")):
            tests = []
            for seed_a, seed_b in zip(results["runs"][a]["seeds"].values(), _cycle(results["runs"][b]["seeds"])):
                ra = seed_a.get(attack, {}).get(eps, {}).get(TASK)
                rb = seed_b.get(attack, {}).get(eps, {}).get(TASK)
                if ra and rb and ra.get("images") and rb.get("images"):
                    tests.append(stats.paired(ra, rb, key))
            if tests:
                rows.append({"a": a, "b": b, "what": what, "attack": attack, "key": key, "tests": tests})
    return rows


def _cycle(per_seed: dict) -> list:
    """A run's seed results, repeated to pair with every seed of another (zero-shot CLIP has one)."""
    values = list(per_seed.values())
    return values * 100 if len(values) == 1 else values


# ---------------------------------------------------------------------- tables

def num(v) -> str:
    """A percentage as a table cell: one decimal, '-' when missing."""
    return "-" if v is None else f"{v:.1f}"


def acc(results: dict, run_name: str, attack: str, eps: str, task: str, key: str, interval: bool = True) -> str:
    """One accuracy: 'mean +- std' over seeds, or with one seed the value and its 95% Wilson interval."""
    r = results["runs"][run_name].get(attack, {}).get(eps, {}).get(task, {})
    if r.get(key) is None:
        return "-"
    if r["n_seeds"] > 1:
        return f"{r[key]:.1f} ± {r[f'{key}_std']:.1f}"
    if not interval:
        return num(r[key])
    low, high = stats.wilson(round(r[key] * r["n_samples"] / 100), r["n_samples"])
    return f"{r[key]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def mean_over(results: dict, run_name: str, eps: str, tasks: list, key: str) -> str:
    """A key's PGD accuracy averaged over tasks (seed means), '-' unless every task was evaluated."""
    by_task = results["runs"][run_name].get("pgd", {}).get(eps, {})
    values = [by_task.get(t, {}).get(key) for t in tasks]
    return "-" if None in values else num(sum(values) / len(values))


def count(n) -> str:
    """A parameter count as a table cell: thousands separated, '-' when missing."""
    return "-" if n is None else f"{n:,}"


def describe(run_name: str) -> tuple:
    """(model, recipe) of a run for the tables."""
    if "@" not in run_name:
        return run_name, {"zeroshot": "-"}.get(run_name, f"{run_name} (own)")
    variant, _, family = run_name.partition("@")
    own = variant in PROMPT_METHODS and recipes.METHOD_RECIPE[variant] == family
    return variant, family + (" (own)" if own else "")


def comparison_table(results: dict, eps: str) -> str:
    """Markdown at one eps: the controlled comparison on the training task, and the transfer average."""
    n_seeds, tasks = len(results["seeds"]), results["tasks"]
    spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed; [95% Wilson interval]"
    header = ["model", "recipe", "trained parameters", f"{TASK} clean", f"{TASK} PGD-{results['steps']}",
              f"{TASK} AutoAttack", "transfer tasks: clean / PGD (average)"]
    lines = [f"Controlled comparison at eps {eps}: every prompt method with each recipe family, trained on {TASK}; "
             f"accuracy (%) on the same {results['samples']} images for PGD and AutoAttack ({spread}):", "",
             "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for r in results["comparison"]:
        model, recipe = describe(r)
        cells = [count(results["runs"][r]["params"]), acc(results, r, "pgd", eps, TASK, "clean"),
                 acc(results, r, "pgd", eps, TASK, "robust"), acc(results, r, "autoattack", eps, TASK, "robust"),
                 f"{mean_over(results, r, eps, tasks[1:], 'clean')} / {mean_over(results, r, eps, tasks[1:], 'robust')}"]
        lines.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(results: dict, eps: str, runs: list, title: str) -> str:
    """Markdown: clean / PGD per task (seed means) for each run."""
    tasks = results["tasks"]
    header = ["run", "trained parameters", *[f"{t} clean / PGD" for t in tasks], "transfer average clean / PGD"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in runs:
        cells = [count(results["runs"][r]["params"]),
                 *[f"{acc(results, r, 'pgd', eps, t, 'clean', False)} / {acc(results, r, 'pgd', eps, t, 'robust', False)}"
                   for t in tasks],
                 f"{mean_over(results, r, eps, tasks[1:], 'clean')} / {mean_over(results, r, eps, tasks[1:], 'robust')}"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict) -> str:
    """Markdown: each paired comparison's difference (a - b, points) and exact McNemar p-value, per seed."""
    lines = [f"Paired comparisons on the same {results['samples']} images of {TASK} at eps {results['eval_eps'][0]} "
             f"(exact McNemar test per seed; a difference counts as beyond noise when p < 0.05 in every seed, "
             f"with the same sign; otherwise the two are level):", "",
             "| comparison | a | b | accuracy | a - b (points), per seed | p, per seed | verdict |", "|---|---|---|---|---|---|---|"]
    for row in results["paired"]:
        diffs, ps = [t["difference"] for t in row["tests"]], [t["p_value"] for t in row["tests"]]
        beyond = all(t["p_value"] < 0.05 for t in row["tests"]) and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
        verdict = ("a higher" if diffs[0] > 0 else "b higher") if beyond else "level"
        what = "clean" if row["key"] == "clean" else {"pgd": "PGD", "autoattack": "AutoAttack"}[row["attack"]]
        lines.append(f"| {row['what']} | {row['a']} | {row['b']} | {what} | "
                     f"{', '.join(f'{d:+.1f}' for d in diffs)} | {', '.join(f'{p:.3g}' for p in ps)} | {verdict} |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """Markdown: PGD robust accuracy on the training task at every sweep eps (eps 0: clean accuracy), seed means."""
    eps = results["sweep_eps"]
    lines = [f"Robust accuracy (%) vs eps: PGD-{results['steps']} on {results['samples']} images of {TASK}, each method "
             f"with its own recipe (eps 0 is the clean accuracy of the same images):", "",
             "| run | " + " | ".join(f"eps {e}" for e in eps) + " |", "|---|" + "---:|" * len(eps)]
    for run_name, points in results["sweep"].items():
        lines.append(f"| {run_name} | " + " | ".join(num(points.get(e)) for e in eps) + " |")
    return "\n".join(lines)


def ablation_table(results: dict) -> str:
    """Markdown: NAP by prompt depth, with and without TokenRefiners, clean / PGD on the training task at each eval eps."""
    eps = results["eval_eps"]
    lines = [f"NAP on {TASK} by prompt depth J, with and without TokenRefiners, NAP's recipe (clean / PGD-{results['steps']} "
             f"accuracy, %, {results['samples']} images):", "",
             "| depth J | refiners | run | " + " | ".join(f"eps {e} clean / PGD" for e in eps) + " |",
             "|---|---|---|" + "---:|" * len(eps)]
    for r in results["ablation"]:
        cells = [f"{acc(results, r['run'], 'pgd', e, TASK, 'clean')} / {acc(results, r['run'], 'pgd', e, TASK, 'robust')}"
                 for e in eps]
        lines.append(f"| {r['depth']} | {'yes' if r['refiners'] else 'no'} | {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict) -> str:
    """TABLE.md: every table of the parts that ran."""
    parts = [comparison_table(results, e) for e in results["eval_eps"]] if results["comparison"] else []
    if results["comparison"]:
        e = results["eval_eps"][0]
        parts.append(task_table(results, e, results["comparison"], f"Every task at eps {e} (clean / PGD, %, seed means):"))
    parts += [paired_table(results)] if results["paired"] else []
    parts += [sweep_table(results)] if results["sweep"] else []
    parts += [ablation_table(results)] if results["ablation"] else []
    if results["transfer"]:
        e = results["eval_eps"][0]
        runs = [r["run"] for r in results["transfer"]]
        names = "; ".join(f"{r['run']}: {r['variant']}" for r in results["transfer"])
        parts.append(task_table(results, e, runs, f"Transfer investigation at eps {e}, trained on {TASK}, scored zero-shot "
                                                  f"on every task (clean / PGD, %, seed means). {names}."))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out, arch = args.out, args.arch
    train_extra, eval_extra = shlex.split(args.train_args), shlex.split(args.eval_args)
    build_toy_first(arch)
    runner = Runner(out, args.jobs, args.seed_list)
    comparison = comparison_runs(args.methods, args.recipes)
    plan = {}
    comparison_plan(plan, comparison, args.methods, args)
    if (args.ablation or args.transfer) and "nap@nap" not in plan:
        plan["nap@nap"] = {}  # the later parts take NAP's depth from its checkpoint
    execute(plan, out, arch, train_extra, eval_extra, runner)

    parts = {"methods": args.methods, "comparison": comparison, "ablation": [], "transfer": []}
    if args.ablation or args.transfer:
        parts["ablation"] = ablation_rows(args.ablation, nap_depth(out, args.seed_list[0])) if args.ablation else []
        parts["transfer"] = transfer_rows() if args.transfer else []
        plan = {}
        for r in parts["ablation"]:
            for eps in args.eval_eps:
                add(plan, r["run"], "pgd", eps, [TASK], args.samples)
        for r in parts["transfer"]:
            add(plan, r["run"], "pgd", args.eval_eps[0], TASKS, args.samples)
        execute(plan, out, arch, train_extra, eval_extra, runner)

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
    print(f"\nwritten: {os.path.join(out, 'TABLE.md')}, {os.path.join(out, 'results.json')}" +
          "".join(f", {p}" for p in pngs) + f"; runs in {out}/RUN/seedS, evaluations in {out}/eval, logs in {out}/logs")


if __name__ == "__main__":
    cmdline.run_cli(main)
