"""One training step per method exactly as train.py takes it (the method's recipe: loss, training attack,
optimiser): trained parameters, optimizer state, seconds, image-encoder passes counted by hooks, peak memory."""
import statistics
import sys
import traceback

import torch

import data
import nap
import runtime
import train
from bench_common import mib, peak_memory, random_images, timed

METHODS = ("advmaple", "nap", "tecoa", "fare")  # two prompt methods, two that fine-tune the image encoder
METHODS_DATASET = "caltech101"  # its recipe settings and class count (100) stand for a few-shot training run


def method_args(method, dataset=METHODS_DATASET):
    """train.py's settings for `method` on `dataset`, with the method's own recipe (recipes.METHOD_RECIPE)."""
    return train.parse_args(["--method", method, "--dataset", dataset])


def step_passes(args, batch):
    """The image-encoder passes of one train.AdversarialStep with args' loss and attack on `batch` images:
    {'grad': images of each pass with a graph (forward + backward), 'forward': images of each forward-only pass}."""
    n, k, clean = batch, args.steps, [batch] if args.clean_weight else []
    if args.loss == "half":  # PGD on the adversarial half (the mask's second half), one loss pass on the whole batch
        adv = n - n // 2
        return {"grad": [adv] * k + [n], "forward": []}
    if args.loss == "adv":  # PGD, CE on x' (and on x with a clean weight)
        return {"grad": [n] * k + [n] + clean, "forward": []}
    if args.loss == "trades":  # clean logits, PGD on the KL, adversarial logits
        return {"grad": [n] + [n] * k + [n], "forward": []}
    if args.loss == "curriculum":  # PGD, then clean and adversarial passes with their block outputs
        return {"grad": [n] * k + [n, n], "forward": []}
    if args.loss == "fare":  # PGD, the distance on x' (and x); forward only: the frozen reference on x, two logged logits
        return {"grad": [n] * k + [n] + clean, "forward": [n, n, n]}
    raise AssertionError(f"step_passes does not know the loss {args.loss!r}")


class Passes:
    """While open, records the passes of step's image encoders (the model's and FARE's frozen reference, by their
    ln_pre) as images per pass, with or without a graph, and of its text encoder (ln_final) as whether it keeps one."""

    def __init__(self, step):
        self.images = [step.model.clip.visual.ln_pre] + ([step.reference.ln_pre] if hasattr(step, "reference") else [])
        self.text_norm = step.model.clip.ln_final

    def __enter__(self):
        self.grad, self.forward, self.text = [], [], []
        image = lambda m, inputs, out: (self.grad if out.requires_grad else self.forward).append(len(inputs[0]))
        self.handles = [m.register_forward_hook(image) for m in self.images]
        self.handles.append(self.text_norm.register_forward_hook(lambda m, i, out: self.text.append(out.requires_grad)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def method_step(backbone, method, device, precision, batch=None, dataset=METHODS_DATASET):
    """(model, AdversarialStep, optimizer, args, step()) for one method as train.main builds them: the method's
    recipe, build_model on `backbone` with the dataset's class count, make_optimizer over the trained tensors, a
    gradient scaler under fp16; step() is train.main's loop body on `batch` random images (default: the recipe's
    batch) with their PGD-start noise and the half loss's clean mask, and returns the loss."""
    args = method_args(method, dataset)
    args.precision, args.device = precision, str(device)
    n, classes = batch or args.batch_size, data.DATASETS[dataset].n_classes
    model = train.build_model(args, backbone, [f"class {i}" for i in range(classes)]).to(device)
    step = train.AdversarialStep(model, args)
    optimizer = train.make_optimizer([p for p in model.parameters() if p.requires_grad], args)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x, y = random_images(model, n, device), torch.arange(n, device=device) % classes
    noise = 2 * random_images(model, n, device, seed=1) - 1  # [-1, 1], as train.SeededViews draws it
    mask = torch.arange(n, device=device) < n // 2  # the half loss keeps the first half clean

    def run():
        with runtime.autocast(device, precision):
            loss, clean, adv = step(x, y, noise, mask, 1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: the loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            train.batch_totals(loss, clean, adv, y, mask, args)
        return loss.item()
    return model, step, optimizer, args, run


def _restore(module, saved):
    """Puts module's parameters and buffers back to `saved` (a CPU copy of its state_dict): values and dtypes."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name in saved:
            t.data = saved[name].to(t.device, copy=True)  # a copy: the next method trains it in place


def bench_methods(backbone, device, precision, batch=None, repeats=3, methods=METHODS, dataset=METHODS_DATASET):
    """One training step of each method as train.py takes it (method_step), on one backbone whose image encoder is
    restored (values and dtypes) after each method. One dict per method: trained parameters (nap.count_parameters
    and the optimizer's share), optimizer state bytes, the median seconds of `repeats` steps after a warm-up step, the image passes
    counted in the warm-up (Passes) and as step_passes predicts them, peak memory (CUDA: max allocated over the
    timed steps; CPU: the saved-tensor proxy of the warm-up); 'error': None, or the one line of a step that failed."""
    visual = {k: v.detach().cpu().clone() for k, v in backbone.visual.state_dict().items()}  # fine-tuning moves it
    rows = []
    for method in methods:
        model, step, optimizer, args, run = method_step(backbone, method, device, precision, batch, dataset)
        n = batch or args.batch_size
        row = dict(method=method, recipe=args.recipe, loss=args.loss, steps=args.steps, optimizer=args.optimizer,
                   batch=n, repeats=repeats, params=nap.count_parameters(model)["total"],
                   optimized=sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
                   expected=step_passes(args, n), error=None)
        try:
            with Passes(step) as passes:
                memory = peak_memory(run, device, step)
            row.update(grad=passes.grad, forward=passes.forward, text=passes.text,
                       state_bytes=sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [timed([run], 1, device)[0][0] for _ in range(repeats)]
            row.update(seconds=statistics.median(times), times=times,
                       memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory)
        except Exception as e:  # e.g. out of memory, or a step train.py cannot take at this precision
            traceback.print_exc(file=sys.stderr)
            row["error"] = f"{type(e).__name__}: {runtime.one_line(e)}"
        del model, step, optimizer, run
        _restore(backbone.visual, visual)
        backbone.requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def report_methods(rows, precision, memory_label, dataset=METHODS_DATASET):
    """The methods table: one row per method, a failed step with its error."""
    r0 = rows[0]
    print(f"\nTraining step per method as train.py takes it: train.AdversarialStep with the method's recipe for "
          f"{dataset} ({data.DATASETS[dataset].n_classes} classes), backward, the recipe's optimiser step"
          f"{' (fp16: with a gradient scaler)' if precision == 'fp16' else ''}; batch {r0['batch']}, {precision}; "
          f"s/step: median of {r0['repeats']} steps after a warm-up. Image-encoder passes per step: "
          "forward+backward (attack steps + loss passes; per image: their images / batch, the half loss attacks "
          "half the batch) and forward-only (FARE: the frozen reference on x, the two logged predictions). Text "
          "encoder: once per step, with a backward where it holds trained prompts.\n")
    print(f"| method | recipe: loss, attack | optimizer | trained params | optimizer state MiB | fwd+bwd passes "
          f"(attack + loss) | per image | fwd-only passes | text encoder | s/step | img/s | {memory_label} |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        head = f"| {r['method']} | {r['recipe']}: {r['loss']}, PGD-{r['steps']} | {r['optimizer']} | {r['params']:,} |"
        if r["error"]:
            print(f"{head} failed: {r['error']} |" + " |" * 7)
            continue
        grad = r["grad"]
        print(f"{head} {r['state_bytes'] / 2 ** 20:,.1f} | {len(grad)} ({r['steps']} + {len(grad) - r['steps']}) | "
              f"{sum(grad) / r['batch']:g} | {len(r['forward'])} | {'fwd+bwd' if any(r['text']) else 'fwd'} | "
              f"{r['seconds']:.3f} | {r['batch'] / r['seconds']:,.2f} | {mib(r['memory'])} |")
