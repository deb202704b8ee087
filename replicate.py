"""replicate.py: the paper's comparison at toy scale, offline, in one command.

    python replicate.py                   # -> runs/replication/TABLE.md

Every method is trained with the same protocol on the `synthetic` task (toy CLIP, 16 shots,
adversarial training with PGD at eps 1/255, the paper's setting), then evaluated together with zero-shot CLIP: clean and
PGD-100 accuracy on a seeded 200-image subset of every synthetic task, AutoAttack on 100 images
of the training task, and an eps sweep of zero-shot CLIP, all at eps 1/255.
It only calls train.py and evaluate.py, exactly as a user would; finished runs are kept, so
running it again resumes. `--train-args` / `--eval-args` pass extra flags through.
"""
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


def train_all(out, arch, eps, epochs, extra):
    for method in METHODS[1:]:
        folder = os.path.join(out, method)
        if os.path.exists(os.path.join(folder, "done")):
            continue
        resume = ["--resume"] if os.path.exists(os.path.join(folder, "checkpoint.pt")) else []
        run("train.py", "--arch", arch, "--dataset", "synthetic", "--method", method, "--eps", eps, "--epochs", str(epochs),
            "--workers", "0", "--out", folder, *resume, *extra)
        open(os.path.join(folder, "done"), "w").close()


def evaluate_all(out, arch, eps, samples, aa_samples, extra):
    """PGD-100 on a seeded subset of every task; AutoAttack and the zero-shot eps sweep on the training task."""
    for method in METHODS:
        model = ["--arch", arch, "--method", "zeroshot"] if method == "zeroshot" else \
                ["--checkpoint", os.path.join(out, method, "checkpoint.pt")]
        common = [*model, "--eps", eps, "--workers", "0", *extra]
        run("evaluate.py", *common, "--attack", "pgd", "--dataset", *synthetic.TASKS, "--n-samples", str(samples),
            "--batch-size", str(samples), "--out", os.path.join(out, "eval", f"{method}-pgd.json"))
        run("evaluate.py", *common, "--attack", "autoattack", "--dataset", "synthetic", "--n-samples", str(aa_samples),
            "--batch-size", str(aa_samples), "--out", os.path.join(out, "eval", f"{method}-autoattack.json"))
    for e in SWEEP:
        run("evaluate.py", "--arch", arch, "--method", "zeroshot", "--attack", "pgd", "--eps", e, "--workers", "0",
            "--dataset", "synthetic", "--n-samples", str(samples), "--batch-size", str(samples),
            "--out", os.path.join(out, "eval", f"sweep-{e.replace('/', '_')}.json"), *extra)


def tables(out) -> str:
    """Markdown: per task and method clean / PGD / AutoAttack, the averages, and the zero-shot eps sweep."""
    pgd = {m: runtime.read_json(os.path.join(out, "eval", f"{m}-pgd.json"), {}) for m in METHODS}
    aa = {m: runtime.read_json(os.path.join(out, "eval", f"{m}-autoattack.json"), {}) for m in METHODS}
    tasks = list(pgd["zeroshot"])
    swept = [t for t in tasks if any(t in runtime.read_json(os.path.join(out, "eval", f"sweep-{e.replace('/', '_')}.json"), {}) for e in SWEEP)]
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    lines = ["| method | " + " | ".join(f"{t} clean / PGD / AA" for t in tasks) + " | average clean / PGD / AA |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for m in METHODS:
        rows = [(pgd[m].get(t, {}).get("clean"), pgd[m].get(t, {}).get("robust"), aa[m].get(t, {}).get("robust")) for t in tasks]
        mean = [sum(r[i] for r in rows) / len(rows) if all(r[i] is not None for r in rows) else None for i in range(3)]
        lines.append(f"| {m} | " + " | ".join(" / ".join(cell(v) for v in r) for r in rows + [tuple(mean)]) + " |")
    sweep = {e: runtime.read_json(os.path.join(out, "eval", f"sweep-{e.replace('/', '_')}.json"), {}) for e in SWEEP}
    lines += ["", "Zero-shot toy CLIP under PGD-100 (robust accuracy, %):", "",
              "| task | clean | " + " | ".join(f"eps {e}" for e in SWEEP) + " |", "|---|---|" + "---|" * len(SWEEP)]
    for t in swept:
        lines.append(f"| {t} | {cell(pgd['zeroshot'][t]['clean'])} | " + " | ".join(cell(sweep[e].get(t, {}).get("robust")) for e in SWEEP) + " |")
    return "\n".join(lines)


def main():
    p = runtime.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/replication")
    p.add_argument("--arch", default="toy", help="the backbone (toy, or a weights file)")
    p.add_argument("--eps", default="1/255", help="training and evaluation eps (4/255 collapses every method on the toy)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of every method")
    p.add_argument("--samples", type=int, default=200, help="PGD on a seeded subset of this size per task")
    p.add_argument("--aa-samples", type=int, default=100, help="AutoAttack on a seeded subset of the training task")
    p.add_argument("--train-args", default="", help="extra train.py flags, e.g. \"--epochs 50\"")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. \"--n-samples 200\"")
    args = p.parse_args()
    start = time.time()
    train_all(args.out, args.arch, args.eps, args.epochs, shlex.split(args.train_args))
    evaluate_all(args.out, args.arch, args.eps, args.samples, args.aa_samples, shlex.split(args.eval_args))
    table = tables(args.out)
    with open(os.path.join(args.out, "TABLE.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    runtime.run_cli(main)
