"""Speed and memory figures as markdown tables: our computation against the peers', in turns (BENCHMARKS.md).

  bench    file              what it measures
  attack   bench_speed.py    time per attack step of attacks.py against straightforward PGD/APGD (a small CNN)
  eval     bench_speed.py    PGD evaluation of a prompted CLIP per class count: ours (text features once per dataset,
                             broken points dropped) against the peers' (the text encoder in every forward, every
                             point attacked every step)
  train    bench_speed.py    one training step, PGD + update: ours (text features once per step) against the peers'
  text     bench_speed.py    one text-encoder pass per class count: what the peers pay at every forward
  flops    bench_flops.py    FLOPs of the image attack step, analytic and counted; MFU; the projected wall time of the
                             paper's PGD-100 protocol
  profile  bench_profile.py  one attack step by part (attention, MLPs, refiners, prompt handling, casts, norms)
  methods  bench_methods.py  one training step per method as train.py takes it (advmaple, nap, tecoa, fare, each with
                             its recipe's loss, attack and optimiser): parameters, optimizer state, seconds, image
                             passes, peak memory
  e2e      bench_e2e.py      PGD-100 evaluation of a trained checkpoint: evaluate.py's path against the peers'
  (suite)  bench_gpu.py      --gpu-suite: every pending GPU figure in one markdown block, with the precision check:
                             PGD-100 robust accuracy of one model in fp16 and in fp32 on the same images, within 0.5
                             points
  (bench_common.py: timing, memory, the random CLIP, ours' and the peers' logits, shared by all)

examples:
  python bench.py --quick       # tiny CLIP on the CPU (one thread), ~30 s
  python bench.py               # ViT-B/16-sized CLIP (random weights: same speed) on the GPU, fp16
  python bench.py --gpu-suite --out gpu-suite.md   # every pending GPU figure, one markdown block, < 8 min on an H100
  python bench.py --compile     # ours through torch.compile (--compile reduce-overhead: + CUDA graphs)
  python bench.py --device cpu --threads 1 --batch-size 8 --steps 2   # ViT-B/16 on a CPU
  python bench.py --bench e2e --checkpoint runs/nap-synthetic/checkpoint.pt --n-samples 300
  python bench.py --bench methods --device cpu --threads 2 --batch-size 2   # ViT-B/16, one step per method on a CPU

Times are the best of --repeats runs taken in turns (CUDA: each run between synchronizes). Memory is
torch.cuda.max_memory_allocated on CUDA; on the CPU, a proxy: the peak bytes of the tensors autograd keeps for
backward (activations, weights excluded). The flags are checked before torch is imported.
"""
import argparse
import os
import re
import sys
from dataclasses import dataclass

import cmdline

# The benches in the order they run: e2e last, so that its summary is the last line
BENCHES = ("attack", "eval", "train", "text", "flops", "profile", "methods", "e2e")
DEFAULT_BENCHES = BENCHES[:5]  # profile, methods and e2e on request

# Each bench's defaults for --batch-size, --steps and --repeats: (full run, --quick)
BATCH = {"attack": (128, 16),  # the small CNN's images
         "eval": (256, 16),  # evaluate.py's --batch-size; 16: the tiny CLIP on a CPU
         "train": (32, 32),  # the baselines recipe's batch
         "profile": (4, 4),  # images of the profiled attack step
         "methods": (None, None),  # None: each method's recipe's (advmaple, nap 32; tecoa 256; fare 128)
         "e2e": (256, 256)}  # evaluate.py's --batch-size
STEPS = {"attack": (100, 10),  # PGD-100 and APGD-CE-100
         "eval": (10, 3),
         "train": (2, 2),  # PGD-2, the baselines recipe's training attack
         "e2e": (100, 100)}  # the paper's PGD-100
REPEATS = {"attack": (5, 1), "eval": (3, 1), "train": (3, 1), "text": (3, 1), "methods": (3, 1)}  # timed runs

# The names the other files define, spelled out here so that a bad flag is refused before torch is imported
# (tests/test_bench.py checks that they agree)
ARCH_NAMES = ("vit-b/16", "tiny")  # bench_common.ARCHS
SUITE_NAMES = ("h100", "cpu-check", "tiny")  # bench_gpu.SUITES
PRECISIONS = ("fp32", "bf16", "fp16")  # runtime.DTYPES
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def positive(text):
    """argparse type: an integer >= 1."""
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def radius(text):
    """argparse type for --eps and --alpha: '1/255' or 0.0039, in [0, 1] (cmdline.parse_eps), kept as written."""
    cmdline.eps_arg(text)
    return text


def device_name(text):
    """argparse type for --device: auto, cpu, cuda or cuda:N (whether it exists is checked once torch is imported)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser():
    """The bench CLI's parser: every flag with its help."""
    description, _, epilog = __doc__.partition("\n\n")
    p = cmdline.Parser(description=description, epilog=epilog)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true", help="the tiny CLIP, small batches, one repeat, one CPU thread "
                                                        "(~30 s on a 2-core CPU, BENCHMARKS.md section 1)")
    p.add_argument("--bench", nargs="+", default=list(DEFAULT_BENCHES), choices=BENCHES, metavar="NAME",
                   help=f"which figures, of {', '.join(BENCHES)} (default: {' '.join(DEFAULT_BENCHES)})")
    p.add_argument("--gpu-suite", nargs="?", const="h100", default=None, choices=SUITE_NAMES, metavar="SIZE",
                   help="instead of --bench: everything BENCHMARKS.md leaves pending, one markdown block (h100, the "
                        "default: < 8 min on one H100; cpu-check: the same parts, a few iterations; tiny: seconds on "
                        "a CPU)")
    p.add_argument("--out", default=None, help="--gpu-suite: also write the markdown block to this file")
    p.add_argument("--device", default="auto", type=device_name, help="auto (cuda if present, the default), cpu, "
                                                                       "cuda, cuda:N")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: fp16 on CUDA (fp16 weights, autocast, as runtime.load_backbone casts them), "
                        "else fp32")
    p.add_argument("--arch", default=None, choices=ARCH_NAMES, help="CLIP size, random weights (default: vit-b/16; "
                                                                    "tiny with --quick)")
    p.add_argument("--classes", type=positive, nargs="+", default=[10, 100, 1000], metavar="N",
                   help="class counts of the prompted CLIP, one table row each (flops: the largest; default: 10 100 "
                        "1000)")
    p.add_argument("--batch-size", type=positive, default=None, metavar="N",
                   help="images per batch in every bench run (default: each bench's: attack 128, eval 256, train 32, "
                        "profile 4, methods each recipe's (advmaple, nap 32; tecoa 256; fare 128), e2e 256; "
                        "--quick: attack and eval 16)")
    p.add_argument("--steps", type=positive, default=None, metavar="N",
                   help="PGD steps in every bench run (default: attack 100, eval 10, train 2, e2e 100; --quick: attack "
                        "10, eval 3)")
    p.add_argument("--eps", default="1/255", type=radius, help="attack radius of eval, train and e2e (default: 1/255; "
                                                               "the attack bench takes 1/255, 8/255 and 16/255)")
    p.add_argument("--repeats", type=positive, default=None, metavar="N",
                   help="timed runs, the best (methods: the median) kept (default: 3, the attack bench 5; 1 with "
                        "--quick)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="eval: ours' logits function through torch.compile (MODE: default, reduce-overhead = CUDA "
                        "graphs, max-autotune)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16/bf16 peak for the MFU "
                                                                   "(default: by the GPU's name)")
    p.add_argument("--threads", type=positive, default=None, metavar="N",
                   help="torch CPU threads (default: torch's; 1 with --quick, steady when other processes share the "
                        "cores)")
    e2e = p.add_argument_group("e2e: PGD evaluation of a trained checkpoint, ours against the peers'")
    e2e.add_argument("--checkpoint", default=None, help="a checkpoint.pt written by train.py (also the model of "
                                                         "--gpu-suite's precision part)")
    e2e.add_argument("--dataset", default=None, help="test set to attack (default: the checkpoint's training set)")
    e2e.add_argument("--n-samples", type=positive, default=None, metavar="N",
                     help="the seeded subset evaluate.py draws (default: all)")
    e2e.add_argument("--alpha", default="1/255", type=radius, help="PGD step size (default: 1/255)")
    e2e.add_argument("--seed", type=int, default=0, help="subset draw and random starts, as evaluate.py's --seed; "
                                                         "batch b is attacked with seed + b (default: 0)")
    e2e.add_argument("--no-early-stop", action="store_true", help="ours without early stopping (then it scores as "
                                                                   "the peers do)")
    return p


def check_args(p, args):
    """Refuses, in one line, flag combinations that cannot run, and output files that cannot be written."""
    if args.gpu_suite is None and "e2e" in args.bench and args.checkpoint is None:
        p.error("--bench e2e needs --checkpoint (a checkpoint.pt written by train.py)")
    if args.checkpoint is not None:
        if args.gpu_suite is None and "e2e" not in args.bench:
            p.error("--checkpoint is for --bench e2e and --gpu-suite")
        if not os.path.isfile(args.checkpoint):
            p.error(f"--checkpoint {args.checkpoint} does not exist; give a checkpoint.pt written by train.py")
    if args.out is not None:
        folder = os.path.dirname(os.path.abspath(args.out))
        if args.gpu_suite is None:
            p.error("--out is for --gpu-suite (the other benches print their tables)")
        if os.path.isdir(args.out):
            p.error(f"--out {args.out} is a folder; give a file name such as {os.path.join(args.out, 'gpu-suite.md')}")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--out {args.out}: the folder {folder} does not exist or cannot be written")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops:g}")


def parse_args(argv=None):
    """The checked flags (nothing heavy imported yet)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def default(args, flag, table, bench):
    """args.<flag> if given, else the bench's default from table (full run, --quick)."""
    value = getattr(args, flag)
    return value if value is not None else table[bench][1 if args.quick else 0]


@dataclass
class Run:
    """One run of benches: the checked flags, the device, precision and CLIP size they share, the random backbone,
    and the eval bench's rows (for the flops bench's MFU)."""
    args: argparse.Namespace
    device: object
    precision: str
    arch: str
    backbone: object = None
    eval_rows: list = None

    def batch(self, bench):
        return default(self.args, "batch_size", BATCH, bench)

    def steps(self, bench):
        return default(self.args, "steps", STEPS, bench)

    def repeats(self, bench):
        return default(self.args, "repeats", REPEATS, bench)


def run_attack(r):
    from bench_speed import bench_attack_step
    bench_attack_step(r.batch("attack"), size=16 if r.args.quick else 32, steps=r.steps("attack"),
                      repeats=r.repeats("attack"), device=r.device)


def run_eval(r):
    import attacks
    from bench_common import memory_label
    from bench_speed import bench_eval, report_eval
    eps = attacks.parse_eps(r.args.eps)
    r.eval_rows = bench_eval(r.backbone, r.args.classes, r.batch("eval"), r.steps("eval"), eps, r.device, r.precision,
                             r.repeats("eval"), r.args.compile)
    report_eval(r.eval_rows, r.args.eps, memory_label(r.device))


def run_train(r):
    import attacks
    from bench_common import memory_label
    from bench_speed import bench_train, report_train
    rows = bench_train(r.backbone, r.args.classes, r.batch("train"), r.steps("train"), attacks.parse_eps(r.args.eps),
                       r.device, r.precision, r.repeats("train"))
    report_train(rows, memory_label(r.device))


def run_text(r):
    from bench_speed import bench_text, report_text
    report_text(bench_text(r.backbone, r.args.classes, r.device, r.precision, r.repeats("text")))


def run_flops(r):
    from bench_common import default_peak, prompted
    from bench_flops import attack_step_counted, report_flops
    model = prompted(r.backbone, max(r.args.classes))
    forward, backward = attack_step_counted(model, 2, r.device)
    report_flops(model, dict(batch=2, forward=forward, backward=backward),
                 max(r.eval_rows, key=lambda row: row["classes"]) if r.eval_rows else None,
                 r.args.peak_tflops or default_peak(r.device))


def run_profile(r):
    from bench_profile import bench_profile, report_profile
    batch, where = r.batch("profile"), "GPU kernels" if r.device.type == "cuda" else "CPU"
    for n in r.args.classes:
        table, wall, _ = bench_profile(r.backbone, n, batch, r.device, r.precision)
        report_profile(table, wall, f"Profile of one attack step of ours ({r.arch}, {n} classes, batch {batch}, "
                                    f"{r.precision}; self times, {where}).")


def run_methods(r):
    from bench_common import memory_label
    from bench_methods import bench_methods, report_methods
    rows = bench_methods(r.backbone, r.device, r.precision, r.batch("methods"), r.repeats("methods"))
    report_methods(rows, r.precision, memory_label(r.device))


def run_e2e(r):
    import attacks
    from bench_e2e import bench_e2e, eval_subset, load_trained, report_e2e
    a, batch, steps = r.args, r.batch("e2e"), r.steps("e2e")
    ours, peers, test, name = load_trained(a.checkpoint, a.dataset, r.device, r.precision)
    indices = eval_subset(len(test), a.n_samples, a.seed)
    result = bench_e2e(ours, peers, test, indices, batch, attacks.parse_eps(a.eps), attacks.parse_eps(a.alpha), steps,
                       a.seed, r.device, r.precision, early_stop=not a.no_early_stop)
    report_e2e(result, f"PGD-{steps} evaluation of {a.checkpoint} on {name} ({len(indices)} test images, seed "
                       f"{a.seed}), eps {a.eps}, step {a.alpha}, batch {batch}, random start; batches in turns. ours: "
                       "evaluate.py's path (text features once, attacks.pgd"
                       + (" without early stopping" if a.no_early_stop else " with early stopping")
                       + "); peers: model.forward (text encoder in every forward), every point every step, the "
                       "last iterate scored (torchattacks' PGD), the same random start.")


RUNS = {"attack": run_attack, "eval": run_eval, "train": run_train, "text": run_text, "flops": run_flops,
        "profile": run_profile, "methods": run_methods, "e2e": run_e2e}


def run_suite(args, device, precision):
    """--gpu-suite: bench_gpu.gpu_suite, exit status 1 if a part failed."""
    from bench_gpu import gpu_suite
    if device.type == "cpu" and args.gpu_suite == "h100":
        print("note: no GPU; the h100 suite takes hours on a CPU (--gpu-suite cpu-check times its parts with a "
              "few iterations, --gpu-suite tiny runs them in seconds)", file=sys.stderr)
    if not gpu_suite(args.gpu_suite, device, precision, args.out, args.peak_tflops, args.checkpoint):
        sys.exit(1)


def run_benches(args, device, precision):
    """The benches args.bench names, in BENCHES' order, each printing its table."""
    from bench_common import machine, random_clip
    r = Run(args, device, precision, args.arch or ("tiny" if args.quick else "vit-b/16"))
    at_gpu_sizes = args.batch_size is None and not args.quick and set(args.bench) & {"eval", "train", "methods"}
    if device.type == "cpu" and at_gpu_sizes:
        print("note: no GPU; ViT-B/16 at the GPU's batch sizes takes hours on a CPU (see --quick, or the CPU "
              "command in bench.py's docstring)", file=sys.stderr)
    print(f"`python {' '.join(sys.argv)}`: {machine(device)}; {precision}"
          + ("" if args.bench == ["e2e"] else f"; {r.arch} CLIP"
             + (", nap preset" if set(args.bench) - {"attack", "methods", "e2e"} else ""))
          + (f", ours compiled ({args.compile})" if args.compile else ""))
    if set(args.bench) - {"attack", "e2e"}:
        r.backbone = random_clip(r.arch, device, precision)
    for name in BENCHES:
        if name in args.bench:
            RUNS[name](r)


def run(args):
    """Runs the checked flags: torch is imported here."""
    import torch
    import runtime
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    device = runtime.resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    if args.gpu_suite:
        run_suite(args, device, precision)
    else:
        run_benches(args, device, precision)


def main(argv=None):
    """python bench.py [flags]: the flags checked before torch is imported; a user's error then is one line
    (runtime.run_cli)."""
    args = parse_args(argv)
    import runtime
    runtime.run_cli(lambda: run(args), "interrupted")


if __name__ == "__main__":
    main()
