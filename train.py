"""train.py: adversarial prompt tuning of a frozen CLIP (NAP-Tuning and the baselines).

    python train.py                                             # toy CLIP on the synthetic task, offline
    python train.py --dataset imagenet --arch ViT-B/16 --method nap
    torchrun --nproc_per_node 8 train.py --dataset imagenet     # data-parallel, same results

Each step makes adversarial images against the current prompted model (L-inf PGD, random start),
with the text features computed once and reused by every PGD iteration, then updates the prompts
and refiners on the chosen loss. `--out/checkpoint.pt` is written atomically after every epoch;
`--resume` continues from it and reaches the same result as an uninterrupted run. Augmentation
and PGD starts are drawn per image from (seed, epoch, index), so the result does not depend on
the number of processes or loader workers.
"""
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import attacks
import data
import nap
import runtime

LOSSES = ("adv", "half", "trades", "curriculum")


def protocol_help(flag: str, text: str = "") -> str:
    """--help text naming a flag's default under the paper's protocol and under the toy one."""
    paper, toy = runtime.PROTOCOLS["paper"][flag], runtime.PROTOCOLS["toy"][flag]
    show = lambda v: f"{round(v * 255)}/255" if flag == "eps" else v
    return f"{text}(default: {show(paper)}; {show(toy)} with --arch toy)"


def parse_args(argv=None):
    p = runtime.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic", help="a dataset name (see data.py), synthetic[-task], or a folder of class folders")
    p.add_argument("--data-root", default=None, help="where the datasets lie (default: $NAP_DATA, else ./data)")
    p.add_argument("--arch", default=None, help="toy, an OpenAI model name (ViT-B/16, ...) or a weights file "
                                                "(default: toy for synthetic data, else ViT-B/16)")
    p.add_argument("--method", default="nap", choices=list(nap.PRESETS), help="a preset of nap.PRESETS")
    p.add_argument("--n-ctx", type=int, default=None, help="text and visual context length (default: the preset's)")
    p.add_argument("--depth", type=int, default=None, help="prompted layers J (default: the preset's)")
    p.add_argument("--coupling", default=None, choices=nap.COUPLINGS, help="(default: the preset's)")
    p.add_argument("--refine", default=None, choices=nap.REFINE, help="TokenRefiners (default: the preset's)")
    p.add_argument("--refiner-init", default=None, choices=nap.REFINER_INITS, help="(default: the preset's)")
    p.add_argument("--shots", type=int, default=None, help=protocol_help("shots", "training images per class "))
    p.add_argument("--epochs", type=int, default=None, help=protocol_help("epochs"))
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split across torchrun processes)")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adamw"), help=protocol_help("optimizer"))
    p.add_argument("--lr", type=float, default=None, help=protocol_help("lr"))
    p.add_argument("--weight-decay", type=float, default=5e-4, help="decoupled for adamw")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs at --warmup-lr before the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate of the warm-up epochs")
    p.add_argument("--augment", default=None, choices=("crop-flip", "none"),
                   help="random resized crop + flip, or none (default: none for synthetic tasks, whose single "
                        "object a 0.08-area crop would cut away; crop-flip otherwise)")
    p.add_argument("--eps", type=runtime.eps_arg, default=None, help=protocol_help("eps", "L-inf radius in pixels "))
    p.add_argument("--alpha", type=runtime.eps_arg, default=None, help="PGD step size (default: eps)")
    p.add_argument("--steps", type=int, default=2, help="PGD steps per training batch")
    p.add_argument("--loss", default=None, choices=LOSSES, help=protocol_help("loss"))
    p.add_argument("--beta", type=float, default=6.0, help="TRADES weight of KL(adv || clean)")
    p.add_argument("--seed", type=int, default=1, help="few-shot draw, initialisation, augmentation and PGD starts")
    p.add_argument("--precision", default="fp32", choices=list(runtime.DTYPES), help="backbone weights and autocast")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    args = p.parse_args(argv)
    args.arch = args.arch or runtime.default_arch(args.dataset)
    for flag, value in runtime.protocol(args.arch).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.augment = args.augment or ("none" if args.dataset.startswith("synthetic") else "crop-flip")
    args.alpha = args.eps if args.alpha is None else args.alpha
    args.out = args.out or os.path.join("runs", f"{args.method}-{os.path.basename(os.path.normpath(args.dataset))}")
    checks = [(args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.steps >= 0, "--steps must be >= 0"), (args.lr > 0, "--lr must be > 0"),
              (args.shots >= 1, "--shots must be >= 1"), (args.workers >= 0, "--workers must be >= 0")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


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
    """This process's share of the epoch's global batches: a seeded permutation, full batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    if n < batch_size:  # fewer images than one batch: a single batch of all of them
        return [perm[world.rank::world.size]]
    lo, hi = world.rank * (batch_size // world.size), (world.rank + 1) * (batch_size // world.size)
    return [perm[s + lo: s + hi] for s in range(0, n - batch_size + 1, batch_size)]


def make_loader(views: SeededViews, epoch: int, args, world, device) -> DataLoader:
    views.epoch = epoch
    return DataLoader(views, batch_sampler=epoch_batches(len(views), args.batch_size, epoch, args.seed, world),
                      num_workers=args.workers, pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------- one training step

class AdversarialStep(torch.nn.Module):
    """forward(x, y, noise, epoch) -> (loss, clean logits, adversarial logits) for one batch; DDP wraps this."""

    def __init__(self, model: nap.PromptedCLIP, args):
        super().__init__()
        self.model, self.args = model, args

    def attack(self, x, y, noise, text_features):
        a = self.args
        if a.steps == 0:
            return x
        fn = lambda images: self.model.logits(images, text_features.detach())
        start = (x + a.eps * noise).clamp(0, 1)
        return attacks.pgd(fn, x, y, a.eps, a.alpha, a.steps, random_start=False, early_stop=False, x_init=start)

    def forward(self, x, y, noise, epoch: int):
        a, model = self.args, self.model
        text = model.text_features()  # once per step; the PGD iterations reuse it without a graph
        if a.loss == "half":  # half the batch clean, half adversarial, one cross-entropy
            h = len(x) // 2
            x_adv = torch.cat([x[:h], self.attack(x[h:], y[h:], noise[h:], text)])
            logits = model.logits(x_adv, text)
            return F.cross_entropy(logits, y), logits[:h], logits[h:]
        x_adv = self.attack(x, y, noise, text)
        if a.loss == "adv":
            adv = model.logits(x_adv, text)
            return F.cross_entropy(adv, y), None, adv
        if a.loss == "trades":
            clean, adv = model.logits(x, text), model.logits(x_adv, text)
            kl = F.kl_div(F.log_softmax(adv, 1), F.log_softmax(clean, 1), log_target=True, reduction="batchmean")
            return F.cross_entropy(clean, y) + a.beta * kl, clean, adv
        # curriculum: ((T-e)/T) CE(clean) + (e/T) (CE(adv) + sum_l (1 - cos(H_l(x), H_l(x_adv))))
        f_clean, h_clean = model.encode_image(x, return_layers=True)
        f_adv, h_adv = model.encode_image(x_adv, return_layers=True)
        scale = model.clip.logit_scale.exp().float()
        clean, adv = scale * f_clean @ text.t(), scale * f_adv @ text.t()
        consistency = sum((1 - F.cosine_similarity(c.flatten(1).float(), d.flatten(1).float())).mean()
                          for c, d in zip(h_clean, h_adv))
        w = epoch / a.epochs
        return (1 - w) * F.cross_entropy(clean, y) + w * (F.cross_entropy(adv, y) + consistency), clean, adv


def scaled_depth(depth: int, backbone) -> int:
    """A preset's depth (set for CLIP's 12 layers) scaled to a shallower backbone: 9 of 12 -> 3 of 4."""
    layers = backbone.transformer.layers
    if depth <= layers:
        return depth
    scaled = max(1, round(depth * layers / 12))
    print(f"note: the preset's depth {depth} is for 12 layers; this CLIP has {layers}, using --depth {scaled}")
    return scaled


def learning_rate(epoch: int, args) -> float:
    """Constant warm-up lr for the first epochs, then cosine from lr towards 0 over the rest."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    span = max(args.epochs - args.warmup_epochs, 1)
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / span))


def make_optimizer(params, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


# ---------------------------------------------------------------------- checkpoints

RESUME_KEYS = ("dataset", "arch", "method", "n_ctx", "depth", "coupling", "refine", "refiner_init", "shots", "seed")


def load_resume(path: str, args):
    """The checkpoint to resume from, checked against this run's arguments."""
    ckpt = nap.load_checkpoint(path)
    saved = ckpt.get("args", {})
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(args, k)]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") + f" {saved[k]}" for k in changed)
        raise ValueError(f"{path} was trained with other settings ({flags}); "
                         f"resume with the same settings or choose another --out")
    return ckpt


def save(model, path, optimizer, epoch, args, history):
    nap.save_checkpoint(model, path, arch=args.arch, epoch=epoch, optimizer=optimizer.state_dict(),
                        rng={"torch": torch.get_rng_state()}, args=vars(args), history=history)


# ---------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    world = runtime.init_world(args.device)
    device = runtime.resolve_device(args.device, world)
    if args.batch_size % world.size:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world.size} processes; use a multiple of {world.size}")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise ValueError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
    if args.resume and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    resume = load_resume(ckpt_path, args) if args.resume else None
    runtime.seed_everything(args.seed)

    full = data.build_dataset(args.dataset, args.data_root, "train")  # checked before the backbone loads
    backbone = runtime.load_backbone(args.arch, device, args.precision)
    resolution = backbone.visual.input_resolution
    full.transform = data.train_transform(resolution) if args.augment == "crop-flip" else data.eval_transform(resolution)
    train_set = data.few_shot(full, args.shots, args.seed)
    preset = nap.PRESETS[args.method]
    depth = args.depth or scaled_depth(preset.depth, backbone)
    cfg = nap.make_config(args.method, text_ctx=args.n_ctx if preset.text_ctx else None,
                          vision_ctx=args.n_ctx if preset.vision_ctx else None, depth=depth,
                          coupling=args.coupling, refine=args.refine, refiner_init=args.refiner_init)
    torch.manual_seed(args.seed)  # prompt and refiner initialisation
    model = nap.PromptedCLIP(backbone, train_set.classnames, cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {args.method!r} has nothing to train; evaluate it with evaluate.py --method {args.method}")
    optimizer = make_optimizer(params, args)
    start_epoch, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["trainable"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        start_epoch, history = resume["epoch"] + 1, list(resume["history"])

    step = AdversarialStep(model, args)
    if world.size > 1:
        frozen = [n for n, p in step.named_parameters() if not p.requires_grad] + [n for n, _ in step.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    views = SeededViews(train_set, args.seed)
    log = None
    if world.main:
        os.makedirs(args.out, exist_ok=True)
        log = open(os.path.join(args.out, "train.log"), "a")
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} {vars(args)}\n")
        n_params = nap.count_parameters(model)
        print(f"{args.method} on {args.dataset} ({len(train_set)} images, {len(train_set.classnames)} classes), "
              f"{args.arch}, {n_params['total']:,} trainable parameters, {world.size} process(es) -> {args.out}")

    for epoch in range(start_epoch, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, args)
        totals = torch.zeros(4, device=device)  # loss sum, clean correct, adv correct, images
        batches = make_loader(views, epoch, args, world, device)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not world.main, leave=False)
        for x, y, noise in bar:
            x, y, noise = (t.to(device, non_blocking=True) for t in (x, y, noise))
            with runtime.autocast(device, args.precision):
                loss, clean, adv = step(x, y, noise, epoch)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss became {loss.item()} in epoch {epoch + 1}; the last good checkpoint "
                                   f"is kept at {ckpt_path}; lower --lr or use --precision fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                totals += torch.stack([loss.detach().float() * len(y),
                                       (clean.argmax(1) == y[:len(clean)]).sum() if clean is not None else torch.zeros((), device=device),
                                       (adv.argmax(1) == y[len(y) - len(adv):]).sum(),
                                       torch.tensor(float(len(y)), device=device)])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if world.size > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, clean_ok, adv_ok, n = totals.tolist()
        record = {"epoch": epoch + 1, "lr": learning_rate(epoch, args), "loss": loss_sum / n,
                  "clean_acc": 100 * clean_ok / n if args.loss != "adv" else None, "adv_acc": 100 * adv_ok / n}
        history.append(record)
        if world.main:
            save(model, ckpt_path, optimizer, epoch, args, history)
            line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if v is not None)
            log.write(line + "\n")
            log.flush()
            tqdm.write(line)
    if world.main:
        print(f"checkpoint: {ckpt_path}")
        log.close()
    runtime.close_world(world)


if __name__ == "__main__":
    runtime.run_cli(main)
