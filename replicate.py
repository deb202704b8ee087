"""replicate.py: the paper's comparison at toy scale, offline, in one command.

    python replicate.py                   # -> runs/replication/TABLE.md

Every method is trained with the same protocol on the `synthetic` task: train.py's defaults for
the toy CLIP (eps 4/255, PGD-2, NAP's curriculum loss, AdamW, 100 images per class, 30 epochs).
Then every method and zero-shot CLIP are evaluated at each --eval-eps (4/255, the training eps,
and 1/255, the paper's main setting): clean and PGD-100 accuracy on a seeded 200-image subset of
every synthetic task, and AutoAttack on 100 images of the training task; zero-shot CLIP also gets
an eps sweep. It only calls train.py and evaluate.py, exactly as a user would; finished runs are
kept, so running it again resumes. `--ablation 4` runs the depth / refiner ablation instead
(the paper's Figures 4 and 5) into ABLATION.md. `--methods` splits the work over several processes that
share --out; `--train-args` / `--eval-args` pass extra flags through.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

import runtime
import synthetic

METHODS = ["zeroshot", "advpt", "advvpt", "advvlp", "advmaple", "nap"]
SWEEP = ["1/255", "2/255", "4/255", "8/255"]


def run(*args):
    print("$ python " + " ".join(args), flush=True)
    if subprocess.run([sys.executable, *args]).returncode:
        raise RuntimeError(f"python {' '.join(args)} failed (its message is above); fix it and run replicate.py again to resume")


def tag(eps: str) -> str:
    return eps.replace("/", "_")


def train_once(folder, arch, *flags):
    """train.py on `synthetic` into folder, unless it finished there before; an interrupted run resumes."""
    if os.path.exists(os.path.join(folder, "done")):
        return
    resume = ["--resume"] if os.path.exists(os.path.join(folder, "checkpoint.pt")) else []
    run("train.py", "--arch", arch, "--dataset", "synthetic", "--workers", "0", "--out", folder, *resume, *flags)
    open(os.path.join(folder, "done"), "w").close()


def train_all(out, arch, methods, extra):
    for method in methods:
        if method != "zeroshot":
            train_once(os.path.join(out, method), arch, "--method", method, *extra)


def evaluate_all(out, arch, methods, eval_eps, samples, aa_samples, extra):
    """PGD-100 on a seeded subset of every task and AutoAttack on the training task, at every eps."""
    for method in methods:
        model = ["--arch", arch, "--method", "zeroshot"] if method == "zeroshot" else \
                ["--checkpoint", os.path.join(out, method, "checkpoint.pt")]
        for eps in eval_eps:
            common = [*model, "--eps", eps, "--workers", "0", *extra]
            run("evaluate.py", *common, "--attack", "pgd", "--dataset", *synthetic.TASKS, "--n-samples", str(samples),
                "--batch-size", str(samples), "--out", os.path.join(out, "eval", f"{method}-pgd-{tag(eps)}.json"))
            run("evaluate.py", *common, "--attack", "autoattack", "--dataset", "synthetic", "--n-samples",
                str(aa_samples), "--batch-size", str(aa_samples),
                "--out", os.path.join(out, "eval", f"{method}-autoattack-{tag(eps)}.json"))
    if "zeroshot" in methods:
        for eps in SWEEP:
            run("evaluate.py", "--arch", arch, "--method", "zeroshot", "--attack", "pgd", "--eps", eps, "--workers", "0",
                "--dataset", "synthetic", "--n-samples", str(samples), "--batch-size", str(samples),
                "--out", os.path.join(out, "eval", f"sweep-{tag(eps)}.json"), *extra)


def table(out, eps) -> str:
    """Markdown at one eps: per task and method clean / PGD / AutoAttack, and the averages."""
    read = lambda kind, m: runtime.read_json(os.path.join(out, "eval", f"{m}-{kind}-{tag(eps)}.json"), {}) or {}
    pgd, aa = {m: read("pgd", m) for m in METHODS}, {m: read("autoattack", m) for m in METHODS}
    tasks = [t for t in synthetic.TASKS if any(t in pgd[m] for m in METHODS)]
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    lines = [f"eps {eps}:", "", "| method | " + " | ".join(f"{t} clean / PGD / AA" for t in tasks) +
             " | average clean / PGD |", "|---|" + "---|" * (len(tasks) + 1)]
    for m in METHODS:
        rows = [(pgd[m].get(t, {}).get("clean"), pgd[m].get(t, {}).get("robust"), aa[m].get(t, {}).get("robust"))
                for t in tasks]
        mean = [sum(r[i] for r in rows) / len(rows) if rows and all(r[i] is not None for r in rows) else None
                for i in range(2)]
        lines.append(f"| {m} | " + " | ".join(" / ".join(cell(v) for v in r) for r in rows) +
                     " | " + " / ".join(cell(v) for v in mean) + " |")
    return "\n".join(lines)


def sweep_table(out) -> str:
    """Markdown: zero-shot CLIP's PGD-100 accuracy on the training task at every eps of SWEEP."""
    sweep = {e: runtime.read_json(os.path.join(out, "eval", f"sweep-{tag(e)}.json"), {}) or {} for e in SWEEP}
    row = lambda key, e: sweep[e].get("synthetic", {}).get(key)
    clean = next((row("clean", e) for e in SWEEP if row("clean", e) is not None), None)
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    return "\n".join(["Zero-shot toy CLIP under PGD-100 (robust accuracy, %):", "",
                      "| task | clean | " + " | ".join(f"eps {e}" for e in SWEEP) + " |", "|---|---|" + "---|" * len(SWEEP),
                      f"| synthetic | {cell(clean)} | " + " | ".join(cell(row("robust", e)) for e in SWEEP) + " |"])


def ablation(out, arch, layers, eval_eps, samples, train_extra, eval_extra) -> str:
    """The paper's Figures 4 and 5 at toy scale: NAP at prompt depth 1..layers, with and without TokenRefiners.

    Refiners sit at layers 2..J, so depth 1 has none. Trained as the main table, PGD-100 on the training task.
    """
    rows = []
    for depth in range(1, layers + 1):
        for refine in (["none"] if depth == 1 else ["none", "both"]):
            name = f"depth{depth}-{refine}"
            folder = os.path.join(out, "ablation", name)
            train_once(folder, arch, "--method", "nap", "--depth", str(depth), "--refine", refine, *train_extra)
            cells = []
            for eps in eval_eps:
                path = os.path.join(out, "ablation", "eval", f"{name}-pgd-{tag(eps)}.json")
                run("evaluate.py", "--checkpoint", os.path.join(folder, "checkpoint.pt"), "--eps", eps, "--attack", "pgd",
                    "--dataset", "synthetic", "--n-samples", str(samples), "--batch-size", str(samples), "--workers", "0",
                    "--out", path, *eval_extra)
                row = runtime.read_json(path, {})["synthetic"]
                cells.append(f"{row['clean']:.1f} / {row['robust']:.1f}")
            rows.append(f"| {depth} | {'yes' if refine == 'both' else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(["NAP on the training task by prompt depth J, with and without TokenRefiners "
                      "(clean / PGD-100 accuracy, %):", "",
                      "| depth J | refiners | " + " | ".join(f"eps {e}" for e in eval_eps) + " |",
                      "|---|---|" + "---|" * len(eval_eps), *rows])


def main():
    p = runtime.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/replication", help="runs, results and TABLE.md")
    p.add_argument("--arch", default="toy", help="the backbone (toy, or a weights file)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="train and evaluate only these")
    p.add_argument("--eval-eps", nargs="+", default=["4/255", "1/255"], help="evaluation radii")
    p.add_argument("--samples", type=int, default=200, help="PGD on a seeded subset of this size per task")
    p.add_argument("--aa-samples", type=int, default=100, help="AutoAttack on a seeded subset of the training task")
    p.add_argument("--ablation", type=int, default=0, metavar="LAYERS",
                   help="instead of the comparison: NAP at depth 1..LAYERS with and without refiners (4 for the toy)")
    p.add_argument("--train-args", default="", help="extra train.py flags, e.g. \"--epochs 50\"")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. \"--steps 20\"")
    args = p.parse_args()
    for eps in args.eval_eps:  # a bad radius fails here, not after the training
        try:
            runtime.eps_arg(eps)
        except argparse.ArgumentTypeError as e:
            p.error(f"--eval-eps: {e}")
    start = time.time()
    if args.ablation:
        text = ablation(args.out, args.arch, args.ablation, args.eval_eps, args.samples,
                        shlex.split(args.train_args), shlex.split(args.eval_args))
        with open(os.path.join(args.out, "ABLATION.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        print(f"wall time {time.time() - start:.0f} s")
        return
    train_all(args.out, args.arch, args.methods, shlex.split(args.train_args))
    evaluate_all(args.out, args.arch, args.methods, args.eval_eps, args.samples, args.aa_samples,
                 shlex.split(args.eval_args))
    text = "\n\n".join([table(args.out, eps) for eps in args.eval_eps] + [sweep_table(args.out)])
    with open(os.path.join(args.out, "TABLE.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    runtime.run_cli(main)
