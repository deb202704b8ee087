"""evaluate.py: clean and robust accuracy of a prompted CLIP over datasets and attacks.

    python evaluate.py --attack pgd                                  # zero-shot ViT-B/16, the paper's datasets, eps 1/255
    python evaluate.py --checkpoint runs/nap-imagenet/checkpoint.pt --attack autoattack
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ... --attack autoattack

Text features are computed once per dataset. The test set is cut into batches; batch b is attacked
with seed (seed + b), so every number is the same whichever process attacks it: under torchrun
process r takes the batches b = r, r + W, ... and the counts are summed exactly. Each finished
batch is kept beside the results file, so an interrupted run resumes where it stopped.

A result is reused only when everything that produced it is the same: the checkpoint's contents
(SHA256), the backbone's weights, the dataset's files (names, sizes, modification times) and every
attack setting; reuse is announced, anything else is recomputed. An --out file that holds results
of other settings is refused, never overwritten; the default --out names the attack and the eps.
Results go to --out as JSON (per dataset: clean and robust accuracy in percent, attack, eps,
steps, samples, seconds, and what produced them) and as a markdown table.
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
    p.add_argument("--vision-weights", default=None, metavar="FILE",
                   help="replace the image encoder with these weights (default: the checkpoint's, if it was trained on some)")
    p.add_argument("--method", default="zeroshot", choices=list(nap.PRESETS), help="without --checkpoint only zeroshot")
    p.add_argument("--template", default=None, help="zero-shot prompt with {} for the class, for zeroshot, tecoa and fare "
                   "(default: CoOp's per-dataset template, e.g. 'a photo of a {}, a type of pet.'; else 'a photo of a {}.')")
    p.add_argument("--dataset", nargs="+", default=None, help="one or more datasets (default: ImageNet + the paper's 9 "
                                                               "transfer datasets; every synthetic task for --arch toy)")
    p.add_argument("--data-root", default=None, help="where the datasets lie (default: $NAP_DATA, else ./data)")
    p.add_argument("--attack", default="pgd", choices=ATTACKS, help="none: clean accuracy only")
    p.add_argument("--eps", type=runtime.eps_arg, default=runtime.EVAL_EPS,
                   help="L-inf radius in pixels, e.g. 1/255 or 4/255 (default: 1/255, the paper's)")
    p.add_argument("--alpha", type=runtime.eps_arg, default=1 / 255, help="PGD step size (default: 1/255)")
    p.add_argument("--steps", type=int, default=100, help="attack iterations (PGD, APGD, FAB)")
    p.add_argument("--queries", type=int, default=5000, help="Square attack queries")
    p.add_argument("--n-samples", type=int, default=None, help="evaluate a seeded random subset of this size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch; batch b is attacked with seed + b")
    p.add_argument("--seed", type=int, default=0, help="subset draw and attack randomness")
    p.add_argument("--precision", default="auto", choices=["auto", *runtime.DTYPES],
                   help="auto: fp16 autocast on a GPU, fp32 on the CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--out", default=None, help="results JSON (default: runs/eval-<name>-<attack>-<eps>.json); "
                                               "a markdown table is written beside it")
    args = p.parse_args(argv)
    if args.checkpoint is None and args.method != "zeroshot":
        p.error(f"--method {args.method} needs --checkpoint: untrained prompts are no result (train.py writes one)")
    for flag in ("steps", "batch_size", "queries", "workers"):
        if getattr(args, flag) < (0 if flag == "workers" else 1):
            p.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'workers' else 1}")
    if args.n_samples is not None and args.n_samples < 1:
        p.error("--n-samples must be >= 1")
    if args.template is not None and "{}" not in args.template:
        p.error(f"--template must contain {{}} for the class name, e.g. \"a photo of a {{}}.\" (got {args.template!r})")
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


# ---------------------------------------------------------------------- what a result depends on

def settings(args) -> dict:
    """The attack and evaluation settings a result depends on."""
    keys = ("attack", "eps", "alpha", "steps", "queries", "n_samples", "batch_size", "seed", "precision")
    return {k: getattr(args, k) for k in keys}


def zero_shot_template(name: str, args) -> str:
    """--template, else CoOp's template for the dataset [B], else 'a photo of a {}.'."""
    if args.template:
        return args.template
    info = data.DATASETS.get(data.dataset_key(name))
    return info.template if info else "a photo of a {}."


def data_identity(name: str, args) -> dict:
    """Which dataset: a folder by its absolute path, a named dataset by name and data root, synthetic by name."""
    if os.path.isdir(name):
        return {"name": os.path.abspath(name), "root": None}
    if name.startswith("synthetic"):
        return {"name": name, "root": None}
    return {"name": name, "root": os.path.abspath(os.path.expanduser(args.data_root or data.default_root()))}


def differences(old: dict, new: dict, prefix="") -> list:
    """The keys (dotted) whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def previous(results: dict, dataset: str, identity: dict, contents: dict, out: str) -> bool:
    """Whether a finished result in --out can be reused: same identity and contents -> True (announced);
    same identity, changed contents -> False (announced, recomputed); another identity -> refused."""
    done = results.get(dataset)
    if done is None:
        return False
    if done.get("identity") != identity:
        diff = differences(done.get("identity", {}), identity) or ["(an older results format)"]
        raise ValueError(f"{out} holds {dataset} results of other settings ({', '.join(diff[:4])} differ); "
                         f"choose another --out, or remove that file to replace them")
    if done.get("contents") == contents:
        print(f"{dataset}: reusing the finished result in {out} (same checkpoint, backbone, data and settings)")
        return True
    changed = ", ".join(differences(done.get("contents", {}), contents))
    print(f"{dataset}: {changed} changed since the result in {out} was computed; recomputing it")
    return False


# ---------------------------------------------------------------------- one dataset, sharded and resumable

def evaluate_dataset(name, dataset, backbone, ckpt, args, world, device, partial_dir) -> dict:
    """Clean/robust accuracy (percent) on one dataset; this process does its share, counts are summed exactly."""
    start = time.time()
    dataset.transform = data.eval_transform(backbone.visual.input_resolution)
    indices = list(range(len(dataset)))
    if args.n_samples is not None and args.n_samples < len(dataset):
        indices = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.n_samples].tolist())
    batches = [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    mine = [b for b in range(len(batches)) if b % world.size == world.rank]

    model = build_model(name, backbone, ckpt, dataset.classnames, args)
    model = model.to(device).eval().requires_grad_(False)  # attacks need input gradients only
    with runtime.autocast(device, args.precision):
        logits = model.logits_fn()  # text features once per dataset

    def fn(images):
        with runtime.autocast(device, args.precision):
            return logits(images).float()

    todo = [b for b in mine if not os.path.exists(os.path.join(partial_dir, f"batch{b:06d}.json"))]
    if world.main and len(todo) < len(mine):
        print(f"{name}: reusing {len(mine) - len(todo)} of {len(mine)} batches from {partial_dir}")
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
              "template": model.cfg.template, "seconds": round(time.time() - start, 2), "settings": settings(args)}
    members = {k: v for k, v in totals.items() if k not in ("n", "clean", "robust")}
    if members:
        result["broken_by"] = members
    return result


def build_model(name, backbone, ckpt, classnames, args) -> nap.PromptedCLIP:
    """Zero-shot CLIP with the dataset's template, or the checkpoint's model on these classes.

    Methods that learn no text (zeroshot, tecoa, fare) score with the zero-shot template; the others
    keep the template they were trained with."""
    if ckpt is None:
        cfg = nap.make_config("zeroshot", template=zero_shot_template(name, args))
        return nap.PromptedCLIP(backbone, classnames, cfg)
    zero_shot = ckpt["config"]["text_ctx"] == 0 and ckpt["config"]["vision_ctx"] == 0
    template = zero_shot_template(name, args) if zero_shot else None
    return nap.from_checkpoint(backbone, ckpt, classnames=classnames, transfer=True, template=template)


def open_partial(partial_dir: str, stamp: dict, world):
    """Makes the folder of finished batches, first emptying it (announced) if a run with other settings left it."""
    marker = os.path.join(partial_dir, "settings.json")
    if world.main:
        if runtime.read_json(marker, stamp) != stamp:
            n = len([f for f in os.listdir(partial_dir) if f.startswith("batch")])
            print(f"discarding {n} batches in {partial_dir}: an interrupted run with other settings or data left them")
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

def default_out(name: str, args) -> str:
    """runs/eval-<name>-<attack>-<eps as n_255>.json"""
    eps = f"{args.eps * 255:.4g}".replace(".", "p") + "_255"
    return os.path.join("runs", f"eval-{name}-{args.attack}-{eps}.json")


def main(argv=None):
    args = parse_args(argv)
    world = runtime.init_world(args.device)
    device = runtime.resolve_device(args.device, world)
    args.precision = runtime.resolve_precision(args.precision, device, args.eps if args.attack != "none" and world.main else None)
    ckpt = nap.load_checkpoint(args.checkpoint) if args.checkpoint else None
    saved = (ckpt or {}).get("backbone", {})
    arch = args.arch or (ckpt.get("arch") if ckpt else None) or "ViT-B/16"
    vision = args.vision_weights or saved.get("vision_weights")
    if ckpt:
        runtime.check_backbone(saved, arch, vision)
    if args.dataset is None:
        import synthetic
        args.dataset = list(synthetic.TASKS) if arch == "toy" else list(data.PAPER_EVAL)
    name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) if ckpt else args.method
    args.out = args.out or default_out(name, args)
    if world.main:
        runtime.check_writable(args.out, folder=False)
    datasets = {d: data.build_dataset(d, args.data_root, "test") for d in args.dataset}  # fail fast
    backbone = runtime.load_backbone(arch, device, args.precision, vision)
    model_id = {"checkpoint": os.path.abspath(args.checkpoint) if ckpt else None, "method": ckpt["config"]["method"]
                if ckpt else "zeroshot", "arch": arch, "vision_weights": os.path.abspath(vision) if vision else None}
    contents_model = {"checkpoint_sha256": runtime.sha256_file(args.checkpoint) if ckpt else None,
                      "backbone": runtime.backbone_record(arch, vision)}

    results = runtime.read_json(args.out, {}) or {}
    for dataset in args.dataset:
        identity = {"model": {**model_id, "template": args.template}, "settings": settings(args),
                    "data": data_identity(dataset, args)}
        contents = {**contents_model, "data": data.fingerprint(datasets[dataset])}
        if previous(results, dataset, identity, contents, args.out):
            continue
        partial_dir = f"{args.out}.partial/{os.path.basename(os.path.normpath(dataset))}"
        open_partial(partial_dir, {"identity": identity, "contents": contents}, world)
        result = evaluate_dataset(dataset, datasets[dataset], backbone, ckpt, args, world, device, partial_dir)
        result.update(checkpoint=args.checkpoint, arch=arch, identity=identity, contents=contents)
        if world.main:
            results[dataset] = result
            runtime.write_json(results, args.out)
            line = f"{dataset}: clean {result['clean']:.2f}"
            tqdm.write(line + (f", robust {result['robust']:.2f} ({args.attack}, eps {args.eps * 255:.4g}/255)"
                               if result["robust"] is not None else ""))
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
            f.write(f"{name}, attack {args.attack}, eps {args.eps * 255:.4g}/255, steps {args.steps}\n\n{table}\n")
        print(table)
        print(f"results: {args.out}")
    runtime.close_world(world)


if __name__ == "__main__":
    runtime.run_cli(main)
