"""--gpu-suite: everything BENCHMARKS.md leaves pending, in one run on one GPU, as one markdown block, each part
priced by its FLOPs and skipped if it would overrun the budget; and its precision part: PGD-100 robust accuracy of
one model in 16 bits and in fp32 on the same images, within half a point."""
import contextlib
import io
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attacks
import data
import nap
import runtime
from bench_common import default_peak, duration, machine, memory_label, mib, our_logits, prompted, random_clip, \
    random_images, timed
from bench_e2e import eval_subset, load_trained, our_batch
from bench_flops import attack_step_counted, image_flops, protocol_seconds, report_flops, text_flops
from bench_methods import METHODS, METHODS_DATASET, bench_methods, method_args, report_methods, step_passes
from bench_profile import bench_profile, report_profile
from bench_speed import bench_eval, bench_text, bench_train, report_eval, report_text, report_train


# ---------------------------------------------------------------------- attack precision: 16 bits against fp32

FP32_SLOWDOWN = 5.0  # an fp32 image-step's time over a 16-bit one's on an H100 [C]: 67 against 989 TFLOP/s dense
                     # peak (no tensor cores: TF32 is off by default), at a higher share of the peak


def near_duplicates(model, n, device, seed=0):
    """n images [n, 3, R, R] in [0, 1]: one random image plus uniform noise, its amplitude rising geometrically from
    4/255 to 128/255 across the images [C]. A random CLIP's features of unrelated images differ by little, so these
    differ by about what an attack changes: each can be a class of its own, some within eps of another, some not."""
    spread = torch.logspace(2, 7, n, base=2).view(-1, 1, 1, 1).to(device) / 255
    return (random_images(model, 1, device, seed) + spread * (2 * random_images(model, n, device, seed + 1) - 1)).clamp(0, 1)


def prototype_logits(model, device, precision, prototypes):
    """A confident classifier on ours' image path, images [B,3,R,R] -> logits [B, K] in float32, under runtime.autocast
    as evaluate.py runs ours: class k is prototypes[k]'s image feature, centred on their mean, logit scale 100 (trained
    CLIP's). Each prototype is its class by tens of logits: a softmax gradient below 16-bit floats' range."""
    with torch.no_grad(), runtime.autocast(device, precision):
        features = model.image_embedding(prototypes).float()
    mean = features.mean(0)
    classes = F.normalize(features - mean, dim=-1)

    def logits(images):
        with runtime.autocast(device, precision):
            return (100 * F.normalize(model.image_embedding(images).float() - mean, dim=-1) @ classes.t()).float()
    return logits


def bench_precision(fns, x, y, eps, steps, batch, seed=0):
    """evaluate.py's PGD-`steps` (step 1/255, early stopping, batch b seeded seed + b) of each logits function in fns
    ({precision: fn}, one model in several precisions) on the same images x [N,3,R,R], labels y [N].
    -> {precision: (clean %, robust %)}."""
    result = {}
    for precision, fn in fns.items():
        clean = robust = 0
        for b, i in enumerate(range(0, len(x), batch)):
            c, a = our_batch(fn, x[i:i + batch], y[i:i + batch], eps, 1 / 255, steps, seed + b)
            clean, robust = clean + int((c == y[i:i + batch]).sum()), robust + int((a == y[i:i + batch]).sum())
        result[precision] = (100 * clean / len(x), 100 * robust / len(x))
    return result


def precision_check(s, backbone, device, precision, checkpoint=None, eps=1 / 255, tolerance=0.5):
    """The GPU suite's precision part: PGD-s.precision_steps robust accuracy of one model in 16 bits (the run's
    precision, fp16 if that is fp32) and in fp32 on the same s.precision_images images, within `tolerance` points
    or an AssertionError. The model: a train.py checkpoint on its test set, else prototype_logits on the suite's
    random backbone (prompted, nap preset) and near_duplicates images."""
    low = precision if precision != "fp32" else "fp16"
    fns = {}
    for p in (low, "fp32"):
        if checkpoint:
            model, _, test, name = load_trained(checkpoint, None, device, p)
            idx = eval_subset(len(test), s.precision_images, 0)
            x = torch.stack([test[i][0] for i in idx]).to(device)
            y = torch.tensor([test[i][1] for i in idx], device=device)
            fns[p], source = our_logits(model, device, p), f"{checkpoint} on {name}"
        else:
            model = prompted(backbone if p == precision else random_clip(s.arch, device, p), 10)
            x = near_duplicates(model, s.precision_images, device)
            y = torch.arange(len(x), device=device)
            fns[p], source = prototype_logits(model, device, p, x), "prototype classifier on the random backbone"
    r = bench_precision(fns, x, y, eps, s.precision_steps, s.eval_batch)
    gap = abs(r[low][1] - r["fp32"][1])
    print(f"\nAttack precision: evaluate.py's PGD-{s.precision_steps} (eps {eps * 255:g}/255, step 1/255, early "
          f"stopping) of one model in {low} (weights and autocast) and in fp32, on the same {len(x)} images; "
          f"{source}.\n")
    print("| precision | clean % | robust % |\n|---|---:|---:|")
    for p, (clean, robust) in r.items():
        print(f"| {p} | {clean:.1f} | {robust:.1f} |")
    verdict = "PASS" if gap <= tolerance else "FAIL"
    print(f"\nprecision: robust {low} {r[low][1]:.1f}%, fp32 {r['fp32'][1]:.1f}%, {gap:.1f} points apart: {verdict} "
          f"(within {tolerance:g})")
    if verdict == "FAIL":
        raise AssertionError(f"robust accuracy in {low} is {gap:.1f} points from fp32's: the attack depends on the "
                             "precision")
    return r


# ---------------------------------------------------------------------- the suites and their budget

@dataclass(frozen=True)
class Suite:
    """Sizes of one --gpu-suite run; est_tflops: the throughput the budget assumes (None: no budget)."""
    arch: str
    classes: tuple
    eval_batch: int
    eval_steps: int
    train_batch: int
    train_steps: int
    step_batch: int
    step_steps: int
    profile_batch: int
    repeats: int
    compile_backend: str
    budget_s: float
    est_tflops: float = None
    compile_s: float = 0.0
    methods_batch: int = 0  # one training step per method (bench_methods) at this batch; 0: no such part
    precision_images: int = 0  # PGD robust accuracy in 16 bits against fp32 (precision_check) on as many; 0: no part
    precision_steps: int = 100  # its PGD steps (evaluate.py's PGD-100)


SUITES = {
    # One H100 in at most 8 minutes: the parts are budgeted at 150 TFLOP/s (15% of the fp16 peak), the precision
    # part's fp32 half at a fifth of that (FP32_SLOWDOWN), plus 150 s of compilation: ~300 s in all; a part that would
    # end after 450 s is skipped (set-up, ~30 s, and start-up come on top). The precision part: PGD-100 on 200 images,
    # so that 0.5 points is one image.
    "h100": Suite("vit-b/16", (10, 100, 1000), 256, 10, 32, 2, 512, 10, 32, 3, "inductor", 450, 150.0, 150.0, 32,
                  precision_images=200),
    # The same parts at ViT-B/16 size with a few iterations each, to time them on a CPU.
    "cpu-check": Suite("vit-b/16", (10, 100), 2, 1, 2, 1, 2, 1, 2, 1, None, float("inf"), methods_batch=2,
                       precision_images=2, precision_steps=1),
    # Every part at tiny size in seconds on a CPU (the test); dynamo with the eager backend stands in for inductor.
    "tiny": Suite("tiny", (3, 30), 4, 2, 4, 1, 4, 2, 2, 1, "eager", float("inf"), methods_batch=2,
                  precision_images=6, precision_steps=4),
}


def methods_work(batch, steps):
    """(image-steps, forward-only image passes, text-encoder class passes) of `steps` training steps of each of
    METHODS at `batch` (step_passes; a fine-tuned encoder's weight gradients counted as one more image-step per
    image, a text backward as two passes)."""
    image = forward = text = 0
    for method in METHODS:
        args, cfg = method_args(method), nap.PRESETS[method]
        passes = step_passes(args, batch)
        image += sum(passes["grad"]) + (batch if cfg.finetune == "vision" else 0)
        forward += sum(passes["forward"])
        graph = cfg.text_ctx > 0 or cfg.refine in ("text", "both")
        text += (3 if graph else 1) * data.DATASETS[METHODS_DATASET].n_classes
    return steps * image, steps * forward, steps * text


def suite_work(s, image_gflop, forward_gflop, text_gflop_per_class):
    """{part: (image-steps, forward-only image passes, text-encoder class passes, GFLOP)}: the work of each part of
    a --gpu-suite run of size s (a text backward counted as two passes)."""
    r, total_c = s.repeats, sum(s.classes)
    work = {
        "text": (0, 0, r * total_c),
        "eval": ((3 * r + 2) * s.eval_batch * s.eval_steps * len(s.classes), 3 * r * s.eval_batch * len(s.classes),
                 (r * s.eval_steps + 2) * total_c),
        "step": ((r + 1) * s.step_batch * s.step_steps, 0, max(s.classes)),
        "flops": (2, 2, 0),
        "train": (2 * (r + 1) * s.train_batch * (s.train_steps + 1) * len(s.classes), 0,
                  (r + 1) * (s.train_steps + 6) * total_c),
        "profile": (3 * s.profile_batch, 0, max(s.classes)),
    }
    if s.methods_batch:
        work["methods"] = methods_work(s.methods_batch, r + 1)
    if s.precision_images:  # two precisions: prototypes, clean, PGD's own clean check, last iterate, scoring
        work["precision"] = (2 * s.precision_images * s.precision_steps, 10 * s.precision_images, 0)
    if s.compile_backend:
        work["compile"] = ((r + 1) * s.step_batch * s.step_steps, 0, max(s.classes))
    return {k: (i, f, t, i * image_gflop + f * forward_gflop + t * text_gflop_per_class) for k, (i, f, t) in work.items()}


def suite_estimates(s, work):
    """Seconds each part is budgeted at s.est_tflops (+ s.compile_s for 'compile'; the fp32 half of 'precision' at
    FP32_SLOWDOWN times the time); zeros without a rate."""
    if s.est_tflops is None:
        return {k: 0.0 for k in work}
    slower = {"precision": (1 + FP32_SLOWDOWN) / 2}
    return {k: w[3] / 1e3 / s.est_tflops * slower.get(k, 1.0) + (s.compile_s if k == "compile" else 0.0)
            for k, w in work.items()}


# ---------------------------------------------------------------------- the parts

def bench_step(model, batch, steps, device, precision, repeats, compile_backend=None):
    """Image-steps per second of the attack step alone (attacks.pgd without early stopping, every point every step)
    on ours' cached logits, eager or through torch.compile(backend); compiled once before the clock starts.
    -> dict(rate, peak bytes or None, compile seconds)."""
    fn = our_logits(model, device, precision)
    if compile_backend:
        fn = torch.compile(fn, backend=compile_backend)
    x, y = random_images(model, batch, device), torch.arange(batch, device=device) % len(model.classnames)
    attack = lambda: attacks.pgd(fn, x, y, 1 / 255, 1 / 255, steps, early_stop=False, seed=0)
    (compile_s, _), = timed([attack], 1, device)  # warm-up, and compilation where compiled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    (seconds, _), = timed([attack], repeats, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(rate=batch * steps / seconds, peak=peak, compile_s=compile_s if compile_backend else 0.0)


@dataclass
class SuiteRun:
    """What the parts of one suite run share: its sizes and settings, the random backbone, the prompted model at the
    largest class count (big) with its attack step's FLOPs, and the text rows a later part reuses."""
    s: Suite
    device: torch.device
    precision: str
    checkpoint: str
    peak: float  # the GPU's dense peak TFLOP/s, or None
    backbone: torch.nn.Module
    big: nap.PromptedCLIP
    forward: int
    backward: int
    text_rows: list = None


def part_text(r):
    r.text_rows = bench_text(r.backbone, r.s.classes, r.device, r.precision, r.s.repeats)
    report_text(r.text_rows)


def part_eval(r):
    rows = bench_eval(r.backbone, r.s.classes, r.s.eval_batch, r.s.eval_steps, 1 / 255, r.device, r.precision,
                      r.s.repeats)
    report_eval(rows, "1/255", memory_label(r.device))


def report_step(r, rows):
    """The attack-step table: image-steps/s, TFLOP/s, MFU, peak memory, compile time and the projected protocol."""
    s, step = r.s, r.forward + r.backward
    text_rows = r.text_rows or bench_text(r.backbone, [max(s.classes)], r.device, r.precision, 1)
    text_per_class = text_rows[-1]["seconds"] / text_rows[-1]["classes"]
    print(f"\nAttack step alone (attacks.pgd without early stopping), {max(s.classes)} classes, batch "
          f"{s.step_batch}, PGD-{s.step_steps}, best of {s.repeats}; MFU against {r.peak or '?'} TFLOP/s; the "
          "paper's PGD-100 protocol (131,233 images) projected at this rate, every image all 100 steps (w = 1) "
          "and half of them (w = 0.5).\n")
    print("| attack step | image-steps/s | TFLOP/s | MFU | peak MiB | compile s | PGD-100 protocol, w = 1 | w = 0.5 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows:
        achieved = row["rate"] * step / 1e12
        mfu = f"{100 * achieved / r.peak:.1f}%" if r.peak else "-"
        memory = mib(row["peak"]) if row["peak"] is not None else "-"
        projected = [duration(protocol_seconds(row["rate"], text_per_class, step, r.forward, work=w))
                     for w in (1.0, 0.5)]
        print(f"| {name} | {row['rate']:,.1f} | {achieved:.2f} | {mfu} | {memory} | {row['compile_s']:.0f} | "
              f"{projected[0]} | {projected[1]} |")


def part_step(r):
    s = r.s
    report_step(r, [("eager", bench_step(r.big, s.step_batch, s.step_steps, r.device, r.precision, s.repeats))])


def part_compile(r):
    s = r.s
    row = bench_step(r.big, s.step_batch, s.step_steps, r.device, r.precision, s.repeats, s.compile_backend)
    report_step(r, [(f"torch.compile ({s.compile_backend})", row)])


def part_flops(r):
    forward, backward = attack_step_counted(r.big, 2, r.device)
    report_flops(r.big, dict(batch=2, forward=forward, backward=backward), None, r.peak)


def part_train(r):
    s = r.s
    rows = bench_train(r.backbone, s.classes, s.train_batch, s.train_steps, 1 / 255, r.device, r.precision, s.repeats)
    report_train(rows, memory_label(r.device))


def part_profile(r):
    s = r.s
    table, wall, _ = bench_profile(r.backbone, max(s.classes), s.profile_batch, r.device, r.precision)
    report_profile(table, wall, f"Profile of one attack step ({max(s.classes)} classes, batch {s.profile_batch}; "
                                f"{'GPU kernel' if r.device.type == 'cuda' else 'CPU'} self times).")


def part_methods(r):
    rows = bench_methods(r.backbone, r.device, r.precision, r.s.methods_batch, r.s.repeats)
    report_methods(rows, r.precision, memory_label(r.device))
    failed = [f"{row['method']} ({row['error']})" for row in rows if row["error"]]
    if failed:
        raise RuntimeError(f"training steps failed: {'; '.join(failed)}")


def part_precision(r):
    precision_check(r.s, r.backbone, r.device, r.precision, r.checkpoint)


# The suite's parts in the order they run (those suite_work prices for the run's Suite); compile last: its time is
# the budget's least known
PARTS = {"text": part_text, "eval": part_eval, "step": part_step, "flops": part_flops, "train": part_train,
         "profile": part_profile, "methods": part_methods, "precision": part_precision, "compile": part_compile}


def suite_setup(size, device, precision, peak_tflops, checkpoint):
    """Prints the suite's heading and its work table; -> (SuiteRun, {part: budgeted seconds})."""
    s = SUITES[size]
    print(f"## GPU suite ({size}): {machine(device)}\n")
    print(f"`python bench.py --gpu-suite {size} --precision {precision}`: {s.arch} CLIP with random weights "
          f"(runtime.load_backbone), nap preset, {precision} (runtime.autocast), eps 1/255, step 1/255.")
    backbone = random_clip(s.arch, device, precision)
    big = prompted(backbone, max(s.classes))
    forward, backward = image_flops(big)
    per_class = text_flops(big) / len(big.classnames)
    work = suite_work(s, (forward + backward) / 1e9, forward / 1e9, per_class / 1e9)
    estimates = suite_estimates(s, work)
    print(f"\nWork of each part (image-step {(forward + backward) / 1e9:.2f} GFLOP, forward {forward / 1e9:.2f}, "
          f"text encoder {per_class / 1e9:.2f} GFLOP per class)"
          + (f"; budget at {s.est_tflops:g} TFLOP/s, {s.budget_s:g} s in all" if s.est_tflops else "") + ".\n")
    print("| part | image-steps | forward-only images | text class-passes | TFLOP | budget s |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, w in work.items():
        print(f"| {k} | {w[0]:,} | {w[1]:,} | {w[2]:,} | {w[3] / 1e3:,.1f} | {estimates[k]:.0f} |")
    peak = peak_tflops or default_peak(device)
    return SuiteRun(s, device, precision, checkpoint, peak, backbone, big, forward, backward), estimates


def run_parts(r, estimates, start, save):
    """Runs each part of the suite in PARTS' order that fits the time left of the budget, calling save() after each;
    a part that fails is reported and the next runs. -> (every part ran and passed, {part: seconds or 'skipped'})."""
    ok, took = True, {}
    for name in [k for k in PARTS if k in estimates]:
        left = r.s.budget_s - (time.monotonic() - start)
        if estimates[name] > left:
            print(f"\n**{name}: skipped**, budgeted {estimates[name]:.0f} s with {left:.0f} s left.")
            took[name] = "skipped"
            continue
        t0 = time.monotonic()
        try:
            PARTS[name](r)
        except Exception as e:  # one failing part (e.g. out of memory) must not cost the others
            traceback.print_exc(file=sys.stderr)
            print(f"\n**{name}: failed**: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            ok = False
        took[name] = f"{time.monotonic() - t0:.0f}"
        if r.device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    return ok, took


class _Tee:
    """A stream writing to several streams."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def gpu_suite(size, device, precision, out, peak_tflops=None, checkpoint=None):
    """Everything BENCHMARKS.md leaves pending, in one run on one GPU (SUITES[size]); prints one markdown block and
    rewrites `out` with it after every part (a run cut short keeps what it finished). A part that would overrun the
    budget is skipped, a part that fails (the precision check's FAIL too) is reported; -> True if every part ran
    and passed. checkpoint: a train.py checkpoint for the precision part (default: the random backbone)."""
    text, start = io.StringIO(), time.monotonic()

    def save():
        if out:
            with open(out, "w") as f:
                f.write(text.getvalue())

    with contextlib.redirect_stdout(_Tee(sys.stdout, text)):
        r, estimates = suite_setup(size, device, precision, peak_tflops, checkpoint)
        save()
        ok, took = run_parts(r, estimates, start, save)
        print("\n| part | budget s | took s |\n|---|---:|---:|")
        for name, value in took.items():
            print(f"| {name} | {estimates[name]:.0f} | {value} |")
        print(f"\nSuite wall time {time.monotonic() - start:.0f} s (model set-up included).")
    save()
    return ok
