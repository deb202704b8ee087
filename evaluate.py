"""evaluate.py: clean and robust accuracy of a prompted CLIP over datasets and attacks.

    python evaluate.py --attack pgd --eps 1/255                      # zero-shot ViT-B/16, the paper's datasets
    python evaluate.py --checkpoint runs/nap-imagenet/checkpoint.pt --attack autoattack
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ... --attack autoattack

Text features are computed once per dataset. The test set is cut into batches; batch b is attacked
with seed (seed + b), so every number is the same whichever process attacks it: under torchrun
process r takes the batches b = r, r + W, ... and the counts are summed exactly. Each finished
batch is kept beside the results file, so an interrupted run resumes where it stopped. Results
go to --out as JSON (per dataset: clean and robust accuracy in percent, attack, eps, steps,
samples, seconds) and as a markdown table.
"""
import os
import shutil
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import attacks
import data
import nap
import runtime

ATTACKS = ("none", "pgd", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack")


def parse_args(argv=None):
    p = runtime.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint.pt written by train.py")
    p.add_argument("--arch", default=None, help="toy, an OpenAI model name or a weights file "
                                                "(default: the checkpoint's, else ViT-B/16)")
    p.add_argument("--method", default="zeroshot", choices=list(nap.PRESETS), help="without --checkpoint only zeroshot")
    p.add_argument("--dataset", nargs="+", default=None, help="one or more datasets (default: ImageNet + the paper's 9 "
                                                               "transfer datasets; every synthetic task for --arch toy)")
    p.add_argument("--data-root", default=None, help="where the datasets lie (default: $NAP_DATA, else ./data)")
    p.add_argument("--attack", default="pgd", choices=ATTACKS, help="none: clean accuracy only")
    p.add_argument("--eps", type=runtime.eps_arg, default=None, help="L-inf radius in pixels, e.g. 1/255 or 4/255 "
                   "(default: 1/255, the paper's; 4/255 for the toy CLIP, as train.py)")
    p.add_argument("--alpha", type=runtime.eps_arg, default=1 / 255, help="PGD step size (default: 1/255)")
    p.add_argument("--steps", type=int, default=100, help="attack iterations (PGD, APGD, FAB)")
    p.add_argument("--queries", type=int, default=5000, help="Square attack queries")
    p.add_argument("--n-samples", type=int, default=None, help="evaluate a seeded random subset of this size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch; batch b is attacked with seed + b")
    p.add_argument("--seed", type=int, default=0, help="subset draw and attack randomness")
    p.add_argument("--precision", default="fp32", choices=list(runtime.DTYPES), help="backbone weights and autocast")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--out", default=None, help="results JSON (default: runs/eval-<name>-<attack>.json); "
                                               "a markdown table is written beside it")
    args = p.parse_args(argv)
    if args.checkpoint is None and args.method != "zeroshot":
        p.error(f"--method {args.method} needs --checkpoint: untrained prompts are no result (train.py writes one)")
    for flag in ("steps", "batch_size", "queries"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.n_samples is not None and args.n_samples < 1:
        p.error("--n-samples must be >= 1")
    return args


# ---------------------------------------------------------------------- attacks

def run_attack(fn, x, y, args, seed: int):
    """-> (adversarial images, per-member counts or {}) for the chosen attack."""
    a, eps = args.attack, args.eps
    if a == "pgd":
        return attacks.pgd(fn, x, y, eps, args.alpha, args.steps, random_start=True, seed=seed), {}
    if a == "apgd-ce":
        return attacks.apgd(fn, x, y, eps, steps=args.steps, loss="ce", seed=seed), {}
    if a == "apgd-t":
        return attacks.apgd_targeted(fn, x, y, eps, steps=args.steps, seed=seed), {}
    if a == "fab-t":
        return attacks.fab_targeted(fn, x, y, eps, steps=args.steps), {}
    if a == "square":
        return attacks.square(fn, x, y, eps, queries=args.queries, seed=seed), {}
    return attacks.autoattack(fn, x, y, eps, seed=seed, steps=args.steps, queries=args.queries, return_info=True)


def evaluate_batch(fn, x, y, args, seed: int) -> dict:
    """Counts for one batch: {'n', 'clean', 'robust', and AutoAttack's per-member counts}."""
    with torch.no_grad():
        clean = int((fn(x).argmax(1) == y).sum())
    counts = {"n": len(y), "clean": clean}
    if args.attack != "none":
        x_adv, info = run_attack(fn, x, y, args, seed)
        with torch.no_grad():
            counts["robust"] = int((fn(x_adv).argmax(1) == y).sum())
        counts.update({k: v for k, v in info.items() if k not in ("clean", "robust")})
    return counts


# ---------------------------------------------------------------------- one dataset, sharded and resumable

def settings(args) -> dict:
    """What a result depends on besides the model; stored with it and compared on resume."""
    keys = ("attack", "eps", "alpha", "steps", "queries", "n_samples", "batch_size", "seed", "precision")
    return {k: getattr(args, k) for k in keys}


def evaluate_dataset(name, dataset, backbone, ckpt, args, world, device, partial_dir) -> dict:
    """Clean/robust accuracy (percent) on one dataset; this process does its share, counts are summed exactly."""
    start = time.time()
    dataset.transform = data.eval_transform(backbone.visual.input_resolution)
    indices = list(range(len(dataset)))
    if args.n_samples is not None and args.n_samples < len(dataset):
        indices = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.n_samples].tolist())
    batches = [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    mine = [b for b in range(len(batches)) if b % world.size == world.rank]

    if ckpt is None:
        model = nap.PromptedCLIP(backbone, dataset.classnames, nap.PRESETS["zeroshot"])
    else:
        model = nap.from_checkpoint(backbone, ckpt, classnames=dataset.classnames, transfer=True)
    model = model.to(device).eval().requires_grad_(False)  # attacks need input gradients only
    with runtime.autocast(device, args.precision):
        logits = model.logits_fn()  # text features once per dataset

    def fn(images):
        with runtime.autocast(device, args.precision):
            return logits(images).float()

    os.makedirs(partial_dir, exist_ok=True)
    todo = [b for b in mine if not os.path.exists(os.path.join(partial_dir, f"batch{b:06d}.json"))]
    loader = DataLoader(Subset(dataset, indices), num_workers=args.workers, pin_memory=device.type == "cuda",
                        batch_sampler=[range(b * args.batch_size, b * args.batch_size + len(batches[b])) for b in todo])
    bar = tqdm(zip(todo, loader), total=len(todo), desc=name, disable=not world.main, leave=False)
    for b, (x, y) in bar:
        counts = evaluate_batch(fn, x.to(device, non_blocking=True), y.to(device), args, seed=args.seed + b)
        runtime.write_json(counts, os.path.join(partial_dir, f"batch{b:06d}.json"))
        bar.set_postfix(clean=counts["clean"], robust=counts.get("robust", "-"))

    totals = {}
    for b in mine:
        for k, v in runtime.read_json(os.path.join(partial_dir, f"batch{b:06d}.json")).items():
            totals[k] = totals.get(k, 0) + v
    keys = sorted(set(totals) | {"n", "clean"} | ({"robust"} if args.attack != "none" else set()))
    if world.size > 1:
        keys = sorted(set().union(*all_gather(keys)))
        summed = torch.tensor([totals.get(k, 0) for k in keys], dtype=torch.int64, device=device)  # nccl: no CPU tensors
        torch.distributed.all_reduce(summed)
        totals = dict(zip(keys, summed.tolist()))
    n = totals["n"]
    result = {"clean": 100 * totals["clean"] / n, "robust": 100 * totals["robust"] / n if "robust" in totals else None,
              "attack": args.attack, "eps": args.eps, "steps": args.steps, "n_samples": n,
              "seconds": round(time.time() - start, 2), "settings": settings(args)}
    members = {k: v for k, v in totals.items() if k not in ("n", "clean", "robust")}
    if members:
        result["broken_by"] = members
    return result


def open_partial(partial_dir: str, stamp: dict, world):
    """Makes the folder of finished batches, first emptying it if a run with other settings (stamp) left it."""
    marker = os.path.join(partial_dir, "settings.json")
    if world.main:
        if runtime.read_json(marker, stamp) != stamp:
            shutil.rmtree(partial_dir)
        os.makedirs(partial_dir, exist_ok=True)
        runtime.write_json(stamp, marker)
    if world.size > 1:
        torch.distributed.barrier()


def all_gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    world = runtime.init_world(args.device)
    device = runtime.resolve_device(args.device, world)
    ckpt = nap.load_checkpoint(args.checkpoint) if args.checkpoint else None
    arch = args.arch or (ckpt.get("arch") if ckpt else None) or "ViT-B/16"
    if args.eps is None:
        args.eps = runtime.protocol(arch)["eps"]
    if args.dataset is None:
        import synthetic
        args.dataset = list(synthetic.TASKS) if arch == "toy" else list(data.PAPER_EVAL)
    name = os.path.splitext(os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))))[0] if ckpt else args.method
    args.out = args.out or os.path.join("runs", f"eval-{name}-{args.attack}.json")
    datasets = {name: data.build_dataset(name, args.data_root, "test") for name in args.dataset}  # fail fast
    backbone = runtime.load_backbone(arch, device, args.precision)

    results = runtime.read_json(args.out, {}) or {}
    for dataset in args.dataset:
        done = results.get(dataset)
        if done is not None and (done.get("settings"), done.get("checkpoint"), done.get("arch")) == (settings(args), args.checkpoint, arch):
            continue  # finished earlier with the same settings
        partial_dir = f"{args.out}.partial/{os.path.basename(os.path.normpath(dataset))}"
        open_partial(partial_dir, {**settings(args), "checkpoint": args.checkpoint, "arch": arch}, world)
        result = evaluate_dataset(dataset, datasets[dataset], backbone, ckpt, args, world, device, partial_dir)
        result.update(checkpoint=args.checkpoint, arch=arch)
        if world.main:
            results[dataset] = result
            runtime.write_json(results, args.out)
            line = f"{dataset}: clean {result['clean']:.2f}"
            tqdm.write(line + (f", robust {result['robust']:.2f} ({args.attack}, eps {args.eps:.5f})" if result["robust"] is not None else ""))
        if world.size > 1:
            torch.distributed.barrier()
        if world.main:
            shutil.rmtree(partial_dir, ignore_errors=True)
            if not os.listdir(os.path.dirname(partial_dir)):
                os.rmdir(os.path.dirname(partial_dir))
    if world.main:
        shown = {d: results[d] for d in args.dataset}
        table = runtime.markdown_table(shown)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"{name}, attack {args.attack}, eps {args.eps:.5f}, steps {args.steps}\n\n{table}\n")
        print(table)
        print(f"results: {args.out}")
    runtime.close_world(world)


if __name__ == "__main__":
    runtime.run_cli(main)
