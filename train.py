"""train.py: adversarial training of CLIP's prompts (NAP-Tuning and the prompt baselines) or its image encoder (TeCoA, FARE).

    python train.py                                             # toy CLIP on the synthetic task, offline
    python train.py --dataset imagenet --arch ViT-B/16 --method nap
    python train.py --method advmaple --recipe nap              # a baseline with NAP's recipe
    python train.py --method nap --recipe nap-logged            # NAP with the recipe of [D]'s one logged run
    python train.py --dataset imagenet --method fare            # FARE's own budget: 20,000 steps on every image
    torchrun --nproc_per_node 8 train.py --dataset imagenet     # data-parallel, same results

Each method trains with its source's recipe (recipes.py: loss, optimiser, schedule, data budget
and training attack; `--help` lists each recipe's evidence); every flag overrides its part. Each
step makes adversarial images against the current model (L-inf PGD in pixel space) with the text
features computed once and reused by every PGD iteration, then updates the trained tensors on the
recipe's loss. The learning rate follows the recipe's schedule: per epoch (Dassl's constant warm-up
then cosine, [B][D]) or per step (a linear warm-up then cosine, [T][F]); a run lasts --epochs, or
--max-steps optimiser steps ([F]). `--shots all` trains on every training image ([T][F]).

`--out/checkpoint.pt` is written atomically after every epoch; `--resume` continues exactly that
run, refusing other settings or other training data (data.fingerprint), and reaches the same
result as an uninterrupted run: the trained tensors, optimiser, gradient scaler and RNG are
restored, and FARE's target encoder f0 is always the backbone as loaded. Augmentation and PGD
starts are drawn per image from (seed, epoch, index), so the result does not depend on the number
of processes or loader workers.
"""
import argparse
import copy
import errno
import math
import os
import time

import cmdline
import recipes

LOSSES = ("adv", "half", "trades", "curriculum", "fare")
STARTS = ("random", "clean")
SCHEDULES = ("epoch", "step")
# Flags that do not change the trained model or its schedule; every other one must match on --resume.
RUN_ONLY = ("workers", "device", "out", "resume")
METHODS = ("zeroshot", *recipes.METHOD_RECIPE)  # nap.PRESETS' names, read from recipes.py, which loads no torch


# ---------------------------------------------------------------------- flags, checked before torch loads

class EpilogFormatter(cmdline.DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """--help as cmdline.Parser's, with the epilog's lines kept as written."""


def parse_args(argv=None):
    p = cmdline.Parser(description=__doc__.split("\n")[0], epilog=recipe_epilog())
    p.formatter_class = EpilogFormatter  # the epilog's one line per recipe kept
    p.add_argument("--dataset", default="synthetic", help="a dataset name (see data.py), synthetic[-task], or a folder of class folders")
    p.add_argument("--data-root", default=None, help="where the datasets lie (default: $NAP_DATA, else ./data)")
    p.add_argument("--subsample-classes", default="all", choices=("all", "base", "new"),
                   help="train on the first half of the classes (base) or the rest (new), Dassl's base-to-new split "
                        "(data.subsample_classes), after the few-shot draw as Dassl does")
    p.add_argument("--arch", default=None, help="toy, an OpenAI model name (ViT-B/16, ...) or a weights file "
                                                "(default: toy for synthetic data, else ViT-B/16)")
    p.add_argument("--vision-weights", default=None, metavar="FILE",
                   help="replace the image encoder with these weights (TeCoA, FARE, QT-AFT files, or a tecoa/fare checkpoint.pt)")
    p.add_argument("--method", default="nap", choices=METHODS, help="a preset of nap.PRESETS")
    p.add_argument("--recipe", default=None, choices=list(recipes.RECIPES),
                   help="train with this source's recipe (default: the method's own, recipes.METHOD_RECIPE; see below)")
    p.add_argument("--n-ctx", type=int, default=None, help="text and visual context length (default: the preset's)")
    p.add_argument("--depth", type=int, default=None, help="prompted layers J (default: the preset's, scaled to the backbone)")
    p.add_argument("--coupling", default=None, choices=cmdline.Later("nap", "COUPLINGS"), metavar="COUPLING",
                   help="%(choices)s (default: the preset's)")
    p.add_argument("--refine", default=None, choices=cmdline.Later("nap", "REFINE"), metavar="WHERE",
                   help="TokenRefiners: %(choices)s (default: the preset's)")
    p.add_argument("--refiner-init", default=None, choices=cmdline.Later("nap", "REFINER_INITS"), metavar="INIT",
                   help="%(choices)s (default: the preset's)")
    add_recipe_flags(p)
    p.add_argument("--seed", type=int, default=1, help="few-shot draw, initialisation, augmentation and PGD starts")
    p.add_argument("--precision", default="auto", choices=["auto", *cmdline.PRECISIONS],
                   help="auto: fp16 autocast on a GPU (with a gradient scaler), fp32 on the CPU")
    p.add_argument("--device", default="auto", type=cmdline.device_arg, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out/checkpoint.pt (same settings and data)")
    args = p.parse_args(argv)
    args.arch = args.arch or cmdline.default_arch(args.dataset)
    if args.method == "zeroshot":
        p.error("method 'zeroshot' has nothing to train; evaluate it with evaluate.py --method zeroshot")
    toy = args.arch == "toy"
    recipe = recipes.recipe_for(args.method, args.recipe, toy=toy)
    args.recipe = recipes.recipe_name(args.method, args.recipe, toy=toy)
    if args.alpha is None and args.eps is not None:  # the recipe's step, as a fraction of the radius actually used
        args.alpha = args.eps * recipe.alpha / recipe.eps
    if args.epochs and args.max_steps is None:  # --epochs alone trains by epochs, whatever the recipe's budget
        args.max_steps = 0
    if args.max_steps and args.epochs is None:  # and --max-steps alone by steps
        args.epochs = 0
    for flag, value in recipes.as_dict(recipe).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.out = args.out or os.path.join("runs", f"{args.method}-{os.path.basename(os.path.normpath(args.dataset))}")
    check_args(p, args)
    return args


def add_recipe_flags(p):
    """The flags of every recipe field (recipes.Recipe), each defaulting to the recipe's value."""
    r = "(default: the recipe's)"
    p.add_argument("--shots", type=shots_arg, default=None,
                   help=f"training images per class; all (or 0): every training image {r}")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the training set; alone, it also sets "
                                                           f"--max-steps 0 {r}")
    p.add_argument("--max-steps", type=int, default=None, help=f"stop after this many optimiser steps, the last epoch "
                                                              f"cut short; alone, it also sets --epochs 0; 0: train "
                                                              f"--epochs epochs {r}")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch size, split across torchrun processes {r}")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adamw"), help=f"sgd has momentum 0.9 {r}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate {r}")
    p.add_argument("--weight-decay", type=float, default=None, help=f"decoupled for adamw {r}")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help=f"epoch: --warmup-epochs at --warmup-lr, then cosine per epoch (Dassl); step: a linear warm-up "
                        f"over --warmup-steps, then cosine per step to 0 (open_clip) {r}")
    p.add_argument("--warmup-epochs", type=int, default=None, help=f"--schedule epoch: epochs at --warmup-lr {r}")
    p.add_argument("--warmup-lr", type=float, default=None, help=f"--schedule epoch: the warm-up epochs' lr {r}")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"--schedule step: steps of the linear warm-up {r}")
    p.add_argument("--augment", default=None, choices=("crop-flip", "none"), help=f"random resized crop + flip, or none {r}")
    p.add_argument("--eps", type=cmdline.eps_arg, default=None, help=f"training attack's L-inf radius in pixels {r}")
    p.add_argument("--alpha", type=cmdline.eps_arg, default=None, help="PGD step size (default: the recipe's, "
                                                                      "scaled with --eps)")
    p.add_argument("--steps", type=int, default=None, help=f"PGD steps per training batch {r}")
    p.add_argument("--start", default=None, choices=STARTS, help=f"PGD start: uniform in the ball, or the clean image {r}")
    p.add_argument("--attack-momentum", type=float, default=None,
                   help=f"PGD's sign momentum m: v <- sign(m v + sign(grad)), step along v; 0: plain PGD {r}")
    p.add_argument("--loss", default=None, choices=LOSSES, help=r)
    p.add_argument("--beta", type=float, default=None, help=f"TRADES weight of KL(clean || adv) {r}")
    p.add_argument("--clean-weight", type=float, default=None, help=f"adv/fare losses: weight of the clean term {r}")


def shots_arg(text: str) -> int:
    """--shots: a count of images per class, or `all` (0) for every training image."""
    if text.strip().lower() == "all":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images per class or 'all', got {text!r}") from None


def check_args(p, args):
    """Refuses settings that cannot train, in one line each (argparse's usage error)."""
    checks = [(args.epochs >= 0 and args.max_steps >= 0, "--epochs and --max-steps must be >= 0"),
              ((args.epochs > 0) != (args.max_steps > 0),
               f"give the run's length once: --epochs {args.epochs} and --max-steps {args.max_steps} "
               f"(--max-steps 0 trains by epochs; --epochs 0 by steps)"),
              (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.steps >= 0, "--steps must be >= 0"), (args.lr > 0, "--lr must be > 0"),
              (args.shots >= 0, "--shots must be >= 1, or all"), (args.workers >= 0, "--workers must be >= 0"),
              (args.depth is None or args.depth >= 1, "--depth must be >= 1 (1 prompts the first layer only)"),
              (args.n_ctx is None or args.n_ctx >= 1, "--n-ctx must be >= 1"),
              (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"), (args.warmup_lr > 0, "--warmup-lr must be > 0"),
              (args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
              (0 <= args.attack_momentum < 1, "--attack-momentum must be in [0, 1), e.g. 0.9 (FARE's)"),
              (args.weight_decay >= 0, "--weight-decay must be >= 0"), (args.beta >= 0, "--beta must be >= 0"),
              (0 <= args.clean_weight <= 1, "--clean-weight must be in [0, 1]")]
    for ok, message in checks:
        if not ok:
            p.error(message)


def recipe_epilog() -> str:
    """--help's closing lines: each recipe with its source tags and evidence, and which one each method trains with."""
    lines = ["recipes (recipes.py; sources: [B] baselines, [D] NAP's development code, [T] TeCoA, [F] FARE, "
             "[C] a choice of this implementation):"]
    lines += [f"  {name}: {recipe.source}" for name, recipe in recipes.RECIPES.items()]
    pairs = ", ".join(f"{m}: {r} {recipes.tag(r)}" for m, r in recipes.METHOD_RECIPE.items())
    toy = ", ".join(f"{r} -> {t}" for r, t in recipes.TOY_RECIPE.items())
    lines += [f"each method's own: {pairs}.",
              f"--arch toy changes {', '.join(recipes.TOY)} for every recipe, and trains {toy}."]
    return "\n".join(lines)


def check_paths(args) -> str:
    """The run's files, before torch loads: --out (writable; its checkpoint.pt absent, or there for --resume), the
    dataset as a path, --data-root, --arch as a file, --vision-weights -> the checkpoint's path."""
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise ValueError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
    if args.resume and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    cmdline.check_inputs(args.dataset, args.data_root, args.arch, args.vision_weights)
    if os.environ.get("RANK", "0") == "0":  # the only process, or torchrun's first: the one that writes --out
        cmdline.check_writable(args.out, folder=True)
    return ckpt_path


if __name__ == "__main__":  # a bad flag, input or --out is refused here, before torch loads (which takes seconds)
    cmdline.run_cli(lambda: check_paths(parse_args()))

import torch  # noqa: E402  (the heavy imports follow the checks above)
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import attacks  # noqa: E402
import data  # noqa: E402
import nap  # noqa: E402
import runtime  # noqa: E402


# ---------------------------------------------------------------------- data: per-image seeded views

class SeededViews(Dataset):
    """(image, label) items -> (augmented image, label, PGD start noise in [-1, 1]), drawn from (seed, epoch, index).

    The random crop, flip and noise of an image depend on nothing else, so any split of the
    batches over processes or workers, and any resume point, sees the same pixels.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 100_003 + self.epoch) * 1_000_003 + i) % 2 ** 63)
            image, label = self.dataset[i]
            return image, label, torch.rand_like(image) * 2 - 1


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, world: runtime.World) -> list:
    """This process's share of the epoch's global batches: [(dataset indices, clean mask for the `half` loss)].

    A seeded permutation cut into full global batches (one batch of everything when n < batch_size);
    process r takes its slice of each. The clean mask marks the images in the first half of the
    global batch, so N processes split clean and adversarial images exactly as one process does.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    if n < batch_size:
        batches = [perm]
        positions = lambda g: range(world.rank, len(g), world.size)
    else:
        batches = [perm[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
        share = batch_size // world.size
        positions = lambda g: range(world.rank * share, (world.rank + 1) * share)
    return [([g[i] for i in positions(g)], torch.tensor([i < len(g) // 2 for i in positions(g)])) for g in batches]


def make_loader(views: SeededViews, epoch: int, args, world, device, limit: int = None):
    """-> ((x, y, noise, clean mask) batches of this process for one epoch, at most `limit` of them; their number)."""
    views.epoch = epoch
    batches = epoch_batches(len(views), args.batch_size, epoch, args.seed, world)[:limit]
    loader = DataLoader(views, batch_sampler=[b for b, _ in batches], num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    return ((x, y, noise, mask) for (x, y, noise), (_, mask) in zip(loader, batches)), len(batches)


# ---------------------------------------------------------------------- one training step

class AdversarialStep(torch.nn.Module):
    """forward(x, y, noise, clean_mask, epoch) -> (loss, clean logits, adversarial logits) for one batch; DDP wraps this.

    noise [N, 3, R, R] in [-1, 1] is the image's own PGD start; clean_mask [N] marks the images the
    `half` loss keeps clean (the first half of the global batch, whichever process holds them).
    """

    def __init__(self, model: nap.PromptedCLIP, args, epochs: int = None):
        super().__init__()
        self.model, self.args = model, args
        self.epochs = epochs or args.epochs  # the curriculum's T: the run's epochs, also when --max-steps sets them
        if args.loss == "fare":  # f0: a frozen copy of the encoder as it is now; build the step before any resume
            self.reference = copy.deepcopy(model.clip.visual).requires_grad_(False)

    def attack(self, fn, x, y, noise, loss=None):
        """PGD from the recipe's start: [N, 3, R, R] -> x_adv (fixed steps, last iterate, as in training)."""
        if self.args.steps == 0:
            return x
        start = (x + self.args.eps * noise).clamp(0, 1) if self.args.start == "random" else x
        return self.pgd(fn, x, y, start, loss)

    def pgd(self, fn, x, y, start, loss=None):
        """The recipe's PGD from `start` [N, 3, R, R] -> x_adv; its sign momentum only where it has one ([F])."""
        a = self.args
        momentum = {"momentum": a.attack_momentum} if a.attack_momentum else {}
        return attacks.pgd(fn, x, y, a.eps, a.alpha, a.steps, random_start=False, early_stop=False, x_init=start,
                           loss=loss, **momentum)

    def forward(self, x, y, noise, clean_mask, epoch: int):
        a, model = self.args, self.model
        text = model.text_features()  # once per step; the PGD iterations reuse it, and the visual prompts, without a graph
        prompts = [p.detach() for p in model.vision_prompts()]
        logits_fn = lambda images: model.logits(images, text.detach(), prompts)
        if a.loss == "half":  # [B]: half of the global batch clean, half adversarial, one cross-entropy
            adv = ~clean_mask
            x_in = x.clone()
            if adv.any():
                x_in[adv] = self.attack(logits_fn, x[adv], y[adv], noise[adv])
            logits = model.logits(x_in, text)
            return F.cross_entropy(logits, y), logits[clean_mask], logits[adv]
        if a.loss == "trades":  # [B] trades.py: the attack ascends KL(f(x) || f(x')) from x + 0.001 N(0, 1)
            clean = model.logits(x, text)
            p_clean = F.softmax(clean.detach(), 1)
            kl = lambda z, _: F.kl_div(F.log_softmax(z, 1), p_clean, reduction="none").sum(1)
            gauss = torch.special.erfinv(noise.clamp(-1 + 1e-6, 1 - 1e-6)) * 2 ** 0.5  # N(0, 1) from the uniform noise
            start = (x + 0.001 * gauss).clamp(0, 1)
            x_adv = self.pgd(logits_fn, x, y, start, kl) if a.steps else x
            adv = model.logits(x_adv, text)
            loss = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
            return F.cross_entropy(clean, y) + a.beta * loss, clean, adv
        if a.loss == "fare":  # [F]: ||f(x') - f0(x)||^2, x' maximising the same distance
            with torch.no_grad():
                target = self.reference(((x - model.mean) / model.std).to(model.clip.visual.proj.dtype)).float()
            dist = lambda e, _: (e.float() - target).pow(2).sum(1)
            x_adv = self.attack(model.image_embedding, x, y, noise, loss=dist)
            loss = dist(model.image_embedding(x_adv), y).mean()
            if a.clean_weight:
                loss = a.clean_weight * dist(model.image_embedding(x), y).mean() + (1 - a.clean_weight) * loss
            with torch.no_grad():  # accuracies for the log only
                return loss, logits_fn(x), logits_fn(x_adv)
        x_adv = self.attack(logits_fn, x, y, noise)
        if a.loss == "adv":  # CE on adversarial images (the paper's objective; TeCoA [T])
            adv = model.logits(x_adv, text)
            loss = F.cross_entropy(adv, y)
            if a.clean_weight:
                clean = model.logits(x, text)
                return a.clean_weight * F.cross_entropy(clean, y) + (1 - a.clean_weight) * loss, clean, adv
            return loss, None, adv
        # curriculum [D]: ((T-e)/T) CE(clean) + (e/T) (CE(adv) + sum_l (1 - cos(H_l(x), H_l(x_adv))))
        f_clean, h_clean = model.encode_image(x, return_layers=True)
        f_adv, h_adv = model.encode_image(x_adv, return_layers=True)
        scale = model.clip.logit_scale.exp().float()
        clean, adv = scale * f_clean @ text.t(), scale * f_adv @ text.t()
        consistency = sum((1 - F.cosine_similarity(c.flatten(1).float(), d.flatten(1).float())).mean()
                          for c, d in zip(h_clean, h_adv))
        w = epoch / self.epochs
        return (1 - w) * F.cross_entropy(clean, y) + w * (F.cross_entropy(adv, y) + consistency), clean, adv


def scaled_depth(depth: int, backbone) -> int:
    """A preset's depth (set for CLIP's 12 layers) scaled to a shallower backbone: 9 of 12 -> 3 of 4."""
    layers = backbone.transformer.layers
    if depth <= layers:
        return depth
    scaled = max(1, round(depth * layers / 12))
    print(f"note: the preset's depth {depth} is for 12 layers; this CLIP has {layers}, using --depth {scaled}")
    return scaled


def run_length(args, per_epoch: int) -> tuple:
    """(epochs, optimiser steps) of the run with `per_epoch` global batches an epoch: --epochs, or --max-steps."""
    if args.max_steps:
        return math.ceil(args.max_steps / per_epoch), args.max_steps
    return args.epochs, args.epochs * per_epoch


def learning_rate(args, epoch: int, epochs: int, step: int = 0, total: int = 1) -> float:
    """The lr of global step `step` of `total` (0-based), in epoch `epoch` of `epochs`, by the recipe's schedule.

    epoch [B][D]: Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), stepped once an
    epoch: warmup_lr for the first warmup_epochs, then 0.5 lr (1 + cos(pi (epoch - warmup_epochs) / epochs))
    ([D]'s log: 1e-6, 1e-4, 9.9384e-05, ... for 20 epochs). step [T][F]: cosine_lr of TeCoA's utils.py and of
    open_clip, set before every step: lr (step + 1) / warmup_steps during the warm-up, then
    0.5 lr (1 + cos(pi (step - warmup_steps) / (total - warmup_steps))).
    """
    if args.schedule == "step":
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - args.warmup_steps) / max(total - args.warmup_steps, 1)))
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / epochs))


def make_optimizer(params, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


# ---------------------------------------------------------------------- checkpoints

def load_resume(path: str, args):
    """The checkpoint to resume from; every setting that shapes the model or its schedule must equal the saved one."""
    ckpt = nap.load_checkpoint(path)
    saved = ckpt.get("args", {})
    mine = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    changed = [k for k in mine if saved.get(k, "(not recorded)") != mine[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {show(k, saved.get(k, '(not recorded)'))} (now {show(k, mine[k])})"
                          for k in changed)
        raise ValueError(f"{path} was trained with other settings: {flags}; resume with the saved settings, "
                         f"or train anew into another --out")
    return ckpt


def show(flag: str, value) -> str:
    """A flag's value as a user types it (radii in /255, 0 shots as all)."""
    if flag == "shots" and value == 0:
        return "all"
    return f"{value * 255:.4g}/255" if flag in ("eps", "alpha") and isinstance(value, float) else str(value)


def data_record(dataset) -> dict:
    """What the run trains on, for --resume to compare: data.fingerprint, the class names and the image count."""
    return {"fingerprint": data.fingerprint(dataset), "classes": list(dataset.classnames), "images": len(dataset)}


def check_data(saved: dict, now: dict, path: str):
    """Refuses a resume on training data other than the run's (its fingerprint differs), naming what changed."""
    if saved is None:
        raise ValueError(f"{path} does not record its training data (an older checkpoint); "
                         f"train anew into another --out")
    if saved["fingerprint"] == now["fingerprint"]:
        return
    gone = [c for c in saved["classes"] if c not in now["classes"]]
    new = [c for c in now["classes"] if c not in saved["classes"]]
    if gone or new:
        what = "; ".join(f"{word} {len(names)} class(es): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                         for word, names in (("lost", gone), ("gained", new)) if names)
    elif saved["images"] != now["images"]:
        what = f"{saved['images']} images then, {now['images']} now"
    else:
        what = (f"the same {now['images']} images of {len(now['classes'])} classes, but files were moved between "
                f"classes, renamed, replaced or rewritten")
    raise ValueError(f"the training data changed since the run in {path} started ({what}); resume with the same data "
                     f"or train anew into another --out")


def save(model, path, optimizer, epoch, record, history, backbone, extra):
    """Writes the epoch's checkpoint atomically; the settings record is the one the run started with.

    extra: {"data": data_record, "scaler": the gradient scaler's state}, for an exact resume. A full disk is one
    line that says what is kept and how to go on (nap.atomic_save leaves the previous file as it was)."""
    kept = os.path.exists(path)
    try:
        nap.save_checkpoint(model, path, arch=record["arch"], backbone=backbone, epoch=epoch,
                            optimizer=optimizer.state_dict(), rng={"torch": torch.get_rng_state()}, args=record,
                            history=history, **extra)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        then = ("the last good checkpoint is kept: free some space, then add --resume to the same command" if kept else
                "nothing was saved yet: free some space, then run the same command again")
        raise OSError(f"no space left on the device writing {path} after epoch {epoch + 1}; {then}") from None


def restore(resume, model, optimizer, scaler) -> tuple:
    """Loads a resumed run's trained tensors, optimiser, scaler and RNG -> (first epoch to train, history so far)."""
    if resume is None:
        return 0, []
    model.load_state_dict(resume["trainable"], strict=False)
    optimizer.load_state_dict(resume["optimizer"])
    if resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    torch.set_rng_state(resume["rng"]["torch"])
    return resume["epoch"] + 1, list(resume["history"])


# ---------------------------------------------------------------------- the log

def collapsed(history: list, n_classes: int, epochs: int = 3) -> bool:
    """True when the last `epochs` epochs had adversarial accuracy at or below chance and CE near ln(classes)."""
    last = history[-epochs:]
    chance, ln_c = 100 / n_classes, math.log(n_classes)
    return len(last) == epochs and all(r.get("adv_ce") is not None and r["adv_acc"] <= chance + 1e-9
                                       and abs(r["adv_ce"] - ln_c) < 0.05 * ln_c for r in last)


def epoch_record(epoch: int, args, totals: torch.Tensor, lr: float = None) -> dict:
    """One epoch's log line: lr (of its last step), mean loss, clean and adversarial accuracy (each over its own
    images), adversarial CE."""
    loss_sum, clean_ok, clean_n, adv_ok, adv_n, adv_ce, n = totals.tolist()
    lr = learning_rate(args, epoch, max(args.epochs, 1)) if lr is None else lr
    return {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / n,
            "clean_acc": 100 * clean_ok / clean_n if clean_n else None, "adv_acc": 100 * adv_ok / adv_n,
            "adv_ce": adv_ce / adv_n if args.loss != "fare" else None}


def batch_totals(loss, clean, adv, y, mask, args) -> torch.Tensor:
    """[loss sum, clean correct, clean count, adv correct, adv count, adv CE sum, images] of one batch."""
    y_clean, y_adv = (y[mask], y[~mask]) if args.loss == "half" else (y, y)
    zero = torch.zeros((), device=y.device)
    return torch.stack([loss.detach().float() * len(y),
                        (clean.argmax(1) == y_clean).sum().float() if clean is not None else zero,
                        torch.tensor(float(len(y_clean) if clean is not None else 0), device=y.device),
                        (adv.argmax(1) == y_adv).sum().float(), torch.tensor(float(len(y_adv)), device=y.device),
                        F.cross_entropy(adv.detach().float(), y_adv, reduction="sum") if len(y_adv) else zero,
                        torch.tensor(float(len(y)), device=y.device)])


# ---------------------------------------------------------------------- main

def build_model(args, backbone, classnames) -> nap.PromptedCLIP:
    """The method's prompted CLIP with the flags' overrides, initialised from --seed."""
    preset = nap.PRESETS[args.method]
    depth = args.depth or scaled_depth(preset.depth, backbone)
    cfg = nap.make_config(args.method, text_ctx=args.n_ctx if preset.text_ctx else None,
                          vision_ctx=args.n_ctx if preset.vision_ctx else None, depth=depth,
                          coupling=args.coupling, refine=args.refine, refiner_init=args.refiner_init)
    if cfg.finetune == "vision":  # trained weights stay float32 (autocast runs their matmuls in 16 bits)
        backbone.visual.float()
    torch.manual_seed(args.seed)  # prompt and refiner initialisation
    return nap.PromptedCLIP(backbone, classnames, cfg)


def start(args, ckpt_path: str) -> tuple:
    """Joins torchrun's processes, resolves the device and precision, seeds, and reads the checkpoint a --resume
    continues -> (world, device, that checkpoint or None)."""
    if args.loss == "fare" and nap.PRESETS[args.method].finetune != "vision":
        raise ValueError(f"--loss fare trains the image encoder; use --method fare or tecoa, not {args.method}")
    world = runtime.init_world(args.device)
    device = runtime.resolve_device(args.device, world)
    args.precision = runtime.resolve_precision(args.precision, device, args.eps if world.main else None)
    if args.batch_size % world.size:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world.size} processes; use a multiple of {world.size}")
    runtime.seed_everything(args.seed)
    return world, device, load_resume(ckpt_path, args) if args.resume else None


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = check_paths(args)
    world, device, resume = start(args, ckpt_path)
    full = data.build_dataset(args.dataset, args.data_root, "train")  # checked before the backbone loads
    trained_on = data_record(full)
    if resume:
        check_data(resume.get("data"), trained_on, ckpt_path)
    backbone = runtime.load_backbone(args.arch, device, args.precision, args.vision_weights)
    record = resume["args"] if resume else {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    identity = runtime.backbone_record(args.arch, args.vision_weights)
    if resume:
        runtime.check_backbone(resume.get("backbone", {}), args.arch, args.vision_weights)
    resolution = backbone.visual.input_resolution
    full.transform = data.train_transform(resolution) if args.augment == "crop-flip" else data.eval_transform(resolution)
    train_set = data.few_shot(full, args.shots, args.seed) if args.shots else full
    train_set = data.subsample_classes(train_set, args.subsample_classes)
    model = build_model(args, backbone, train_set.classnames).to(device)
    views = SeededViews(train_set, args.seed)
    per_epoch = max(len(views) // args.batch_size, 1)  # global batches an epoch (epoch_batches)
    epochs, total = run_length(args, per_epoch)
    step = AdversarialStep(model, args, epochs)  # before restore: FARE's f0 is the encoder as loaded, not a resumed one
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start_epoch, history = restore(resume, model, optimizer, scaler)
    if world.size > 1:
        frozen = [n for n, p in step.named_parameters() if not p.requires_grad] + [n for n, _ in step.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    log = open_log(args, resume, model, train_set, world, total) if world.main else None
    for epoch in range(start_epoch, epochs):
        totals, lr = train_epoch(step, optimizer, scaler, views, epoch, (epochs, total, per_epoch), args, world, device,
                                 ckpt_path)
        history.append(epoch_record(epoch, args, totals, lr))
        if world.main:
            save(model, ckpt_path, optimizer, epoch, record, history, identity,
                 {"data": trained_on, "scaler": scaler.state_dict()})
            log_epoch(log, history, len(train_set.classnames))
    if world.main:
        print(f"checkpoint: {ckpt_path}")
        log.close()
    runtime.close_world(world)


def open_log(args, resume, model, train_set, world, total):
    """Opens --out/train.log for appending, notes the start or resume in it and prints the run's summary."""
    log = open(os.path.join(args.out, "train.log"), "a")
    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} {vars(args)}\n")
    n_params = nap.count_parameters(model)
    print(f"{args.method} on {args.dataset} ({len(train_set)} images, {len(train_set.classnames)} classes), "
          f"{args.arch}, recipe {args.recipe}: {args.loss} loss, {args.optimizer} lr {args.lr:g} ({args.schedule} "
          f"schedule, {total:,} steps), PGD-{args.steps} at {show('eps', args.eps)}; {n_params['total']:,} trained "
          f"parameters; {world.size} process(es) -> {args.out}")
    return log


def train_epoch(step, optimizer, scaler, views, epoch, plan, args, world, device, ckpt_path) -> tuple:
    """One epoch's optimiser steps, plan = (epochs, total steps, steps an epoch) -> (its batch totals summed over the
    processes, the lr of its last step). The last epoch of a --max-steps run stops at the total."""
    epochs, total, per_epoch = plan
    first = epoch * per_epoch
    totals, lr = torch.zeros(7, device=device), None
    batches, n_batches = make_loader(views, epoch, args, world, device, limit=total - first)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", total=n_batches, disable=not world.main, leave=False)
    for i, (x, y, noise, mask) in enumerate(bar):
        lr = learning_rate(args, epoch, epochs, first + i, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, noise, mask = (t.to(device, non_blocking=True) for t in (x, y, noise, mask))
        with runtime.autocast(device, args.precision):
            loss, clean, adv = step(x, y, noise, mask, epoch)
        if not torch.isfinite(loss):
            raise runtime.RunError(f"the loss became {loss.item()} in epoch {epoch + 1}; the last good checkpoint "
                                   f"is kept at {ckpt_path}; lower --lr or use --precision fp32")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            totals += batch_totals(loss, clean, adv, y, mask, args)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if world.size > 1:
        torch.distributed.all_reduce(totals)
    return totals, lr


def log_epoch(log, history: list, n_classes: int):
    """Writes the last epoch's line to train.log and the terminal, and names a collapse when one starts."""
    line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in history[-1].items() if v is not None)
    log.write(line + "\n")
    log.flush()
    tqdm.write(line)
    if collapsed(history, n_classes) and not collapsed(history[:-1], n_classes):
        tqdm.write(f"note: training has collapsed: adversarial accuracy at chance and the loss at "
                   f"ln({n_classes}) for 3 epochs; what usually helps: a lower --lr, "
                   f"--loss half or curriculum (--recipe nap), or a smaller --eps")


if __name__ == "__main__":
    cmdline.run_cli(main, "interrupted; every finished epoch is kept in --out/checkpoint.pt: "
                          "add --resume to the same command to continue")
