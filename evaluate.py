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
Results go to --out as JSON (per dataset: clean and robust accuracy in percent, each with its n and
95% Wilson interval, attack, PGD's scoring, eps, steps, seconds, what produced them, and which
images were evaluated and which of them were right, for stats.paired) and as a markdown table.

Nothing the user made is changed: an existing --out that is not a results file of evaluate.py, or
a .md beside it that evaluate.py did not write, is refused before any work; one run at a time
writes an --out (runtime.exclusive: a second is refused in one line).

PGD's scoring (--pgd-score): "any" counts a point broken once the clean image or any iterate fools
the model (AutoAttack's convention, the stronger); "last" scores the last iterate alone, as
torchattacks.PGD does in the baselines' code [B]. The same holds for cw and tpgd; --attack transfer
crafts the images on --surrogate (zero-shot CLIP or a checkpoint) and scores the model on them
(any: on them or the clean image), and --save-adv keeps them for the next model.

The flags, the files they name and the output locations are checked before torch is imported
(seconds): a mistake is one line and exit status 2 at once.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import time

import cmdline
import recipes

# apgd-ce+apgd-t: the reduced ensemble TeCoA / RobustVLM report as "AA"; it is not AutoAttack [C]
ATTACKS = ("none", "pgd", "cw", "tpgd", "transfer", "apgd-ce", "apgd-t", "apgd-ce+apgd-t", "fab-t", "square",
           "autoattack")
PGD_SCORES = ("any", "last")  # any: AutoAttack's convention (Croce & Hein 2020); last: torchattacks.PGD's [B]
SCORED = ("pgd", "cw", "tpgd", "transfer")  # the attacks --pgd-score scores
TRANSFER_FLAGS = ("surrogate", "diverse_inputs", "save_adv")  # --attack transfer's own
TABLE_MARK = "<!-- evaluate.py's table of"  # the first line of every .md evaluate.py writes
METHODS = ("zeroshot", *recipes.METHOD_RECIPE)  # nap.PRESETS' names, read from recipes.py, which loads no torch
EVAL_EPS = 1 / 255  # the default radius: the paper's, for every backbone (the toy included)


# ---------------------------------------------------------------------- the command line, checked before torch loads

def parse_args(argv=None):
    p = cmdline.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint.pt written by train.py")
    p.add_argument("--arch", default=None, help="toy, an OpenAI model name or a weights file "
                                                "(default: the checkpoint's, else ViT-B/16)")
    p.add_argument("--vision-weights", default=None, metavar="FILE",
                   help="replace the image encoder with these weights (default: the checkpoint's, if it was trained on some)")
    p.add_argument("--method", default=None, choices=METHODS,
                   help="the model's method (default: the checkpoint's; without --checkpoint zeroshot, the only one)")
    p.add_argument("--template", default=None, help="zero-shot prompt with {} for the class, for zeroshot, tecoa and fare "
                   "(default: CoOp's per-dataset template, e.g. 'a photo of a {}, a type of pet.'; else 'a photo of a {}.')")
    p.add_argument("--dataset", nargs="+", default=None, help="one or more datasets (default: ImageNet + the 9 transfer "
                                                               "datasets [B] evaluates, data.PAPER_EVAL; every synthetic "
                                                               "task for --arch toy)")
    p.add_argument("--data-root", default=None, help="where the datasets lie (default: $NAP_DATA, else ./data)")
    p.add_argument("--subsample-classes", default="all", choices=("all", "base", "new"),
                   help="score the first half of each dataset's classes (base) or the rest (new), relabelled, Dassl's "
                        "base-to-new split (data.subsample_classes)")
    p.add_argument("--attack", default="pgd", choices=ATTACKS,
                   help="none: clean accuracy only; pgd: PGD-CE; cw: PGD on the CW margin and tpgd: PGD on TRADES' KL "
                        "(both as APT evaluates); transfer: I-FGSM or DI-FGSM on --surrogate, scored on the model; the "
                        "rest: AutoAttack's members and ensembles (attacks.py names each one's source)")
    p.add_argument("--pgd-score", default="any", choices=PGD_SCORES,
                   help="pgd, cw, tpgd: any: a point is broken once any iterate fools the model (AutoAttack's "
                        "convention); last: only the last iterate counts (torchattacks.PGD, the baselines' code); "
                        "transfer: any: broken if the clean or the crafted image fools the model; last: the crafted "
                        "image alone")
    p.add_argument("--surrogate", default=None, metavar="MODEL",
                   help="--attack transfer: the model the images are crafted on: zeroshot (zero-shot CLIP on --arch, "
                        "without --vision-weights, with the dataset's CoOp template whatever --template says) or a "
                        "checkpoint.pt (default: zeroshot)")
    p.add_argument("--diverse-inputs", type=float, default=0.0, metavar="P",
                   help="--attack transfer: DI-FGSM's input diversity with probability P at each step (attacks."
                        "diverse_inputs; 0.5 is torchattacks' and the baselines'); 0: plain I-FGSM")
    p.add_argument("--save-adv", default=None, metavar="DIR",
                   help="--attack transfer: keep the crafted images in DIR, one file per batch named by the hash of "
                        "everything they depend on (surrogate, images, labels, seed, eps, steps, ...): a later run "
                        "reuses them, for any model (float32, 0.6 MB per 224-px image)")
    p.add_argument("--eps", type=cmdline.eps_arg, default=EVAL_EPS,
                   help="L-inf radius in pixels, e.g. 1/255 or 4/255 (default: 1/255, the paper's)")
    p.add_argument("--alpha", type=cmdline.eps_arg, default=1 / 255, help="PGD step size (default: 1/255)")
    p.add_argument("--steps", type=int, default=100, help="attack iterations (PGD, APGD, FAB)")
    p.add_argument("--queries", type=int, default=5000, help="Square attack queries")
    p.add_argument("--n-samples", type=int, default=None, help="evaluate a seeded random subset of this size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch; batch b is attacked with seed + b")
    p.add_argument("--seed", type=int, default=0, help="subset draw and attack randomness")
    p.add_argument("--precision", default="auto", choices=["auto", *cmdline.PRECISIONS],
                   help="auto: fp16 autocast on a GPU, fp32 on the CPU")
    p.add_argument("--device", default="auto", type=cmdline.device_arg, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--out", default=None, help="results JSON (default: runs/eval-<name>-<attack>-<eps>.json); "
                                               "a markdown table is written beside it")
    args = p.parse_args(argv)
    if args.checkpoint is None and args.method not in (None, "zeroshot"):
        p.error(f"--method {args.method} needs --checkpoint: untrained prompts are no result (train.py writes one)")
    if args.checkpoint is None:
        args.method = "zeroshot"
    if args.pgd_score != "any" and args.attack not in SCORED:
        p.error(f"--pgd-score {args.pgd_score} scores PGD; it needs --attack pgd, cw, tpgd or transfer "
                f"(got --attack {args.attack})")
    for flag in TRANSFER_FLAGS:
        if args.attack != "transfer" and getattr(args, flag) not in (None, 0.0):
            p.error(f"--{flag.replace('_', '-')} is --attack transfer's; drop it or add --attack transfer")
    if args.attack == "transfer":
        args.surrogate = args.surrogate or "zeroshot"
    if not 0 <= args.diverse_inputs <= 1:
        p.error(f"--diverse-inputs {args.diverse_inputs:g} is a probability; give one in [0, 1], e.g. 0.5")
    if args.out and os.path.splitext(args.out)[1].lower() == ".md":
        p.error(f"--out {args.out}: the results are JSON and the table is written beside them as .md; "
                f"give a .json name such as {os.path.splitext(args.out)[0]}.json")
    for flag in ("steps", "batch_size", "queries", "workers"):
        if getattr(args, flag) < (0 if flag == "workers" else 1):
            p.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'workers' else 1}")
    if args.n_samples is not None and args.n_samples < 1:
        p.error("--n-samples must be >= 1")
    if args.template is not None and "{}" not in args.template:
        p.error(f"--template must contain {{}} for the class name, e.g. \"a photo of a {{}}.\" (got {args.template!r})")
    return args


def check_paths(args):
    """The run's files, before torch loads: --checkpoint and --surrogate exist; each --dataset given as a path,
    --data-root, --arch given as a file and --vision-weights exist; --out (its default set here) can be written and
    holds nothing but evaluate.py's results, nor does the .md beside it; --save-adv can be written."""
    surrogate = None if args.surrogate in (None, "zeroshot") else args.surrogate
    for flag, path in (("--checkpoint", args.checkpoint), ("--surrogate", surrogate)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path} does not exist; give the path of a checkpoint.pt written by "
                                    f"train.py")
    for dataset in args.dataset or [None]:
        cmdline.check_inputs(dataset, args.data_root, args.arch, args.vision_weights)
    args.out = args.out or default_out(model_name(args.checkpoint), args)
    if os.environ.get("RANK", "0") == "0":  # the only process, or torchrun's first: the one that writes --out
        if args.save_adv:
            cmdline.check_writable(args.save_adv, folder=True, flag="--save-adv")
        cmdline.check_writable(args.out, folder=False)
        read_results(args.out)
        table_path(args.out)


def default_out(name: str, args) -> str:
    """runs/eval-<name>-<attack>[-from-<surrogate>[-di<P>]][-last]-<eps as n_255>.json"""
    eps = f"{args.eps * 255:.4g}".replace(".", "p") + "_255"
    scoring = "-last" if args.pgd_score == "last" else ""
    source = ""
    if args.attack == "transfer":
        source = f"-from-{model_name(args.surrogate)}" + (f"-di{args.diverse_inputs:g}" if args.diverse_inputs else "")
    return os.path.join("runs", f"eval-{name}-{args.attack}{source}{scoring}-{eps}.json")


def model_name(checkpoint) -> str:
    """A model's short name: its checkpoint's folder (runs/<name>/checkpoint.pt), else zeroshot."""
    return os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) if checkpoint not in (None, "zeroshot") \
        else "zeroshot"


# ---------------------------------------------------------------------- the user's files

# what evaluate.py wrote into the .md before TABLE_MARK (a line naming the run, then the table): ours too
OLD_TABLE = re.compile(r"[^\n]*, attack [^\n]*, eps [^\n]*/255, steps \d+\n\n\| dataset \| clean \| robust \|\n"
                       r"\|---\|---:\|---:\|\n(\|[^\n]*\|\n)+")


def read_results(out: str) -> dict:
    """The results already in --out ({} if there is no such file), refusing a file evaluate.py did not write."""
    if not os.path.exists(out):
        return {}
    refuse = (f"--out {out} exists and is not a results file of evaluate.py ({{dataset: result with identity and "
              f"contents}}); it is left as it is: move it away, or choose another --out")
    try:
        with open(out) as f:
            results = json.load(f)
    except ValueError:  # not JSON, or not text
        raise ValueError(refuse) from None
    if not (isinstance(results, dict) and results and all(
            isinstance(r, dict) and isinstance(r.get("identity"), dict) and isinstance(r.get("contents"), dict)
            for r in results.values())):
        raise ValueError(refuse)
    return results


def table_path(out: str) -> str:
    """The .md beside --out, where the table goes, refusing one that evaluate.py did not write."""
    path = os.path.splitext(out)[0] + ".md"
    if not os.path.lexists(path):
        return path
    text = ""
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            text = f.read(1 << 20)
    if text.startswith(TABLE_MARK) or OLD_TABLE.fullmatch(text):
        return path
    raise ValueError(f"{path} exists and evaluate.py did not write it; the table of --out {out} would replace it: "
                     f"move it away, or choose another --out")

if __name__ == "__main__":  # a bad flag, input or --out is refused here, before torch loads (which takes seconds)
    cmdline.run_cli(lambda: check_paths(parse_args()))

import torch  # noqa: E402  (the heavy imports follow the checks above)
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import attacks  # noqa: E402
import data  # noqa: E402
import nap  # noqa: E402
import runtime  # noqa: E402
import stats  # noqa: E402




# ---------------------------------------------------------------------- attacks

def run_attack(fn, x, y, args, seed: int, craft=None):
    """-> (adversarial images, per-member counts or {}) for the chosen attack; craft(x, y, seed): transfer's images."""
    a, eps, any_iterate = args.attack, args.eps, args.pgd_score == "any"
    if a == "pgd":  # early_stop=False returns the last iterate, which evaluate_batch then scores
        return attacks.pgd(fn, x, y, eps, args.alpha, args.steps, random_start=True, seed=seed,
                           early_stop=any_iterate), {}
    if a == "cw":  # APT's: from x, no random start
        return attacks.cw(fn, x, y, eps, args.alpha, args.steps, seed=seed, early_stop=any_iterate), {}
    if a == "tpgd":
        return attacks.tpgd(fn, x, y, eps, args.alpha, args.steps, seed=seed, early_stop=any_iterate), {}
    if a == "transfer":
        return craft(x, y, seed), {}
    if a == "apgd-ce":
        return attacks.apgd(fn, x, y, eps, steps=args.steps, loss="ce", seed=seed), {}
    if a == "apgd-t":
        return attacks.apgd_targeted(fn, x, y, eps, steps=args.steps, seed=seed), {}
    if a == "fab-t":
        return attacks.fab_targeted(fn, x, y, eps, steps=args.steps), {}
    if a == "square":
        return attacks.square(fn, x, y, eps, queries=args.queries, seed=seed), {}
    if a == "apgd-ce+apgd-t":
        return attacks.autoattack(fn, x, y, eps, version="apgd-ce+apgd-t", seed=seed, steps=args.steps, return_info=True)
    return attacks.autoattack(fn, x, y, eps, seed=seed, steps=args.steps, queries=args.queries, return_info=True)


PER_IMAGE = ("clean_correct", "robust_correct")  # a batch's per-image flags, beside its counts


def evaluate_batch(fn, x, y, args, seed: int, craft=None) -> dict:
    """Images (B, 3, H, W), labels (B,) -> {'n', 'clean', 'robust', the ensembles' per-member counts,
    'clean_correct', 'robust_correct' ('0'/'1' per image)}. craft: --attack transfer's crafting (crafter())."""
    with torch.no_grad():
        clean = fn(x).argmax(1) == y
    counts = {"n": len(y), "clean": int(clean.sum()), "clean_correct": stats.bits(clean.tolist())}
    if args.attack != "none":
        x_adv, info = run_attack(fn, x, y, args, seed, craft)
        with torch.no_grad():
            right = fn(x_adv).argmax(1) == y
        if args.attack == "transfer" and args.pgd_score == "any":  # a clean error stays one, as other attacks keep it
            right &= clean
        counts.update(robust=int(right.sum()), robust_correct=stats.bits(right.tolist()))
        counts.update({k: v for k, v in info.items() if k not in ("clean", "robust")})
    return counts


# ---------------------------------------------------------------------- what a result depends on

def settings(args) -> dict:
    """The attack and evaluation settings a result depends on (transfer's surrogate: its path, or zeroshot)."""
    keys = ("attack", "pgd_score", "eps", "alpha", "steps", "queries", "n_samples", "batch_size", "seed", "precision")
    out = {k: getattr(args, k) for k in keys}
    if args.attack == "transfer":  # only then, so that every other result keeps its identity
        out.update(surrogate=surrogate_id(args.surrogate), diverse_inputs=args.diverse_inputs)
    return out


def surrogate_id(surrogate: str) -> str:
    """--surrogate as a result names it: zeroshot, or the checkpoint's absolute path."""
    return surrogate if surrogate == "zeroshot" else os.path.abspath(surrogate)


def zero_shot_template(name: str, template: str = None) -> str:
    """template (--template), else CoOp's template for the dataset [B], else 'a photo of a {}.'."""
    if template:
        return template
    info = data.DATASETS.get(data.dataset_key(name))
    return info.template if info else "a photo of a {}."


def data_identity(name: str, args) -> dict:
    """Which dataset: a folder by its absolute path, a named dataset by name and data root, synthetic by name; and
    which of its classes (only when not all, so results of all classes keep their identity)."""
    classes = {} if args.subsample_classes == "all" else {"classes": args.subsample_classes}
    if os.path.isdir(name):
        return {"name": os.path.abspath(name), "root": None, **classes}
    if name.startswith("synthetic"):
        return {"name": name, "root": None, **classes}
    return {"name": name, "root": os.path.abspath(os.path.expanduser(args.data_root or data.default_root())), **classes}


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
    old = json.loads(json.dumps(done["identity"]))
    if isinstance(old.get("settings"), dict):
        old["settings"].setdefault("pgd_score", "any")  # before --pgd-score every PGD result scored any iterate
    if old != identity:
        diff = differences(old, identity) or ["(an older results format)"]
        raise ValueError(f"{out} holds {dataset} results of other settings ({', '.join(diff[:4])} differ); "
                         f"choose another --out, or remove that file to replace them")
    if done.get("contents") == contents and "images" not in done:
        print(f"{dataset}: the result in {out} was written by an older evaluate.py, without intervals and per-image "
              f"correctness; recomputing it")
        return False
    if done.get("contents") == contents:
        print(f"{dataset}: reusing the finished result in {out} (same checkpoint, backbone, data and settings)")
        return True
    changed = ", ".join(differences(done.get("contents", {}), contents))
    print(f"{dataset}: {changed} changed since the result in {out} was computed; recomputing it")
    return False


# ---------------------------------------------------------------------- one dataset, sharded and resumable

def evaluate_dataset(name, dataset, backbone, ckpt, args, world, device, partial_dir, surrogate=None) -> dict:
    """Clean/robust accuracy (percent, with n and 95% Wilson intervals) and per-image correctness on one
    dataset; this process does its share, counts are summed exactly. surrogate: load_surrogate()'s, for transfer."""
    start = time.time()
    dataset.transform = data.eval_transform(backbone.visual.input_resolution)
    indices = list(range(len(dataset)))
    if args.n_samples is not None and args.n_samples < len(dataset):
        indices = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.n_samples].tolist())
    batches = [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    mine = [b for b in range(len(batches)) if b % world.size == world.rank]

    model = build_model(name, backbone, ckpt, dataset.classnames, args.template)
    model = model.to(device).eval().requires_grad_(False)  # attacks need input gradients only
    with runtime.autocast(device, args.precision):
        logits = model.logits_fn()  # text features once per dataset

    def fn(images):
        with runtime.autocast(device, args.precision):
            return logits(images).float()

    craft = crafter(name, dataset.classnames, fn, surrogate, args, device) if surrogate else None
    todo = [b for b in mine if not os.path.exists(os.path.join(partial_dir, f"batch{b:06d}.json"))]
    if world.main and len(todo) < len(mine):
        print(f"{name}: reusing {len(mine) - len(todo)} of {len(mine)} batches from {partial_dir}")
    loader = DataLoader(Subset(dataset, indices), num_workers=args.workers, pin_memory=device.type == "cuda",
                        batch_sampler=[range(b * args.batch_size, b * args.batch_size + len(batches[b])) for b in todo])
    bar = tqdm(zip(todo, loader), total=len(todo), desc=name, disable=not world.main, leave=False)
    for b, (x, y) in bar:
        counts = evaluate_batch(fn, x.to(device, non_blocking=True), y.to(device), args, seed=args.seed + b,
                                craft=craft)
        runtime.write_json(counts, os.path.join(partial_dir, f"batch{b:06d}.json"))
        bar.set_postfix(clean=counts["clean"], robust=counts.get("robust", "-"))

    if craft and args.save_adv and todo:
        print(f"{name}: crafted images of {craft.read} of {len(todo)} batches read from {args.save_adv}, "
              f"{len(todo) - craft.read} crafted and kept there")
    totals, flags = gather(mine, partial_dir, args, world, device)
    result = {**accuracy(totals, "clean"), **accuracy(totals, "robust"), "attack": args.attack,
              "pgd_score": args.pgd_score, "eps": args.eps, "steps": args.steps, "n_samples": totals["n"],
              "template": model.cfg.template, "seconds": round(time.time() - start, 2), "settings": settings(args)}
    members = {k: v for k, v in totals.items() if k not in ("n", "clean", "robust")}
    if members:
        result["broken_by"] = members
    per_image = {k.split("_")[0]: "".join(flags[b][k] or "?" * len(batches[b]) for b in range(len(batches)))
                 for k in PER_IMAGE}  # '?': a batch file that recorded no per-image flags
    if args.attack == "none":
        per_image["robust"] = None
    result["images"] = stats.image_record(len(dataset), indices, per_image)
    return result


def gather(mine, partial_dir, args, world, device) -> tuple:
    """The finished batches of every process -> (summed counts, {batch: {per-image flags or None}})."""
    totals, flags = {}, {}
    for b in mine:
        counts = runtime.read_json(os.path.join(partial_dir, f"batch{b:06d}.json"))
        flags[b] = {k: counts.pop(k, None) for k in PER_IMAGE}
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    if world.size > 1:
        keys = sorted(set(totals) | {"n", "clean"} | ({"robust"} if args.attack != "none" else set()))
        keys = sorted(set().union(*all_gather(keys)))
        summed = torch.tensor([totals.get(k, 0) for k in keys], dtype=torch.int64, device=device)  # nccl: no CPU tensors
        torch.distributed.all_reduce(summed)
        totals = dict(zip(keys, summed.tolist()))
        flags = {b: f for part in all_gather(flags) for b, f in part.items()}
    return totals, flags


def accuracy(totals: dict, key: str) -> dict:
    """{key: percent, key_ci95: [low, high] (Wilson, percent, 2 decimals)} of totals[key] of totals['n']; None if absent."""
    if key not in totals:
        return {key: None, f"{key}_ci95": None}
    low, high = stats.wilson(totals[key], totals["n"])
    return {key: 100 * totals[key] / totals["n"], f"{key}_ci95": [round(100 * low, 2), round(100 * high, 2)]}


def build_model(name, backbone, ckpt, classnames, template=None) -> nap.PromptedCLIP:
    """Zero-shot CLIP with the dataset's template, or the checkpoint's model on these classes.

    Methods that learn no text (zeroshot, tecoa, fare) score with zero_shot_template(name, template); the
    others keep the template they were trained with."""
    if ckpt is None:
        cfg = nap.make_config("zeroshot", template=zero_shot_template(name, template))
        return nap.PromptedCLIP(backbone, classnames, cfg)
    zero_shot = ckpt["config"]["text_ctx"] == 0 and ckpt["config"]["vision_ctx"] == 0
    template = zero_shot_template(name, template) if zero_shot else None
    return nap.from_checkpoint(backbone, ckpt, classnames=classnames, transfer=True, template=template)


def load_surrogate(args, arch, backbone, device) -> tuple:
    """--attack transfer's surrogate -> (its checkpoint or None, its own backbone, what identifies its contents),
    refusing one whose image size differs from the model's. The backbone is never the model's: a checkpoint that
    fine-tunes the image encoder loads its weights into the backbone it is built on."""
    if args.surrogate == "zeroshot":
        ckpt, s_arch, s_vision = None, arch, None
    else:
        ckpt = nap.load_checkpoint(args.surrogate)
        saved = ckpt.get("backbone", {})
        s_arch, s_vision = ckpt.get("arch") or "ViT-B/16", saved.get("vision_weights")
        runtime.check_backbone(saved, s_arch, s_vision, surrogate=args.surrogate)
    s_backbone = runtime.load_backbone(s_arch, device, args.precision, s_vision)
    size, theirs = backbone.visual.input_resolution, s_backbone.visual.input_resolution
    if theirs != size:
        raise ValueError(f"--surrogate {args.surrogate} takes {theirs}-px images, the model {size}-px ones: a transfer "
                         f"attack needs a surrogate of the model's image size")
    record = {"checkpoint_sha256": runtime.sha256_file(args.surrogate) if ckpt else None,
              "backbone": runtime.backbone_record(s_arch, s_vision)}
    return ckpt, s_backbone, record


def crafter(name, classnames, fn, surrogate, args, device):
    """--attack transfer's crafting: craft(x, y, seed) -> attacks.transfer's images from the surrogate on these classes,
    read from --save-adv where a run kept them: one file per batch, named by the SHA256 of all they depend on (the
    surrogate's contents, template and classes, eps, alpha, steps, DI, precision, seed, the images and labels).
    craft.read counts the batches read."""
    s_ckpt, s_backbone, record = surrogate
    model = build_model(name, s_backbone, s_ckpt, classnames).to(device).eval().requires_grad_(False)  # no --template
    with runtime.autocast(device, args.precision):
        logits = model.logits_fn()

    def sfn(images):
        with runtime.autocast(device, args.precision):
            return logits(images).float()

    recipe = {"surrogate": record, "template": model.cfg.template, "classnames": list(classnames),
              **{k: getattr(args, k) for k in ("eps", "alpha", "steps", "diverse_inputs", "precision")}}

    def craft(x, y, seed):
        path = None
        if args.save_adv:
            digest = hashlib.sha256(json.dumps({**recipe, "seed": seed}, sort_keys=True).encode())
            for t in (x, y):
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            path = os.path.join(args.save_adv, f"{digest.hexdigest()[:32]}.pt")
            if os.path.exists(path):
                craft.read += 1
                try:
                    return torch.load(path, map_location=x.device, weights_only=True)["images"]
                except Exception as e:
                    raise ValueError(f"{path} (--save-adv) cannot be read ({type(e).__name__}); remove it and it is "
                                     f"crafted again") from None
        x_adv = attacks.transfer(fn, x, y, args.eps, sfn, args.alpha, args.steps, args.diverse_inputs, seed)
        if path:
            nap.atomic_save({"images": x_adv.cpu(), "crafted": {**recipe, "seed": seed}}, path)
        return x_adv
    craft.read = 0
    return craft


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


def partial_folder(out: str, dataset: str, data_id: dict) -> str:
    """Where a dataset's finished batches wait: <out>.partial/<name>. A synthetic task is named by its
    name, all of its identity; anything else by its base name and a short hash of its whole data identity,
    so two folders of one base name (a/data, b/data) never share or discard each other's batches."""
    base = os.path.basename(os.path.normpath(dataset))
    if data_id["root"] is None and not os.path.isabs(data_id["name"]):
        return f"{out}.partial/{base}"
    digest = hashlib.sha256(json.dumps(data_id, sort_keys=True).encode()).hexdigest()[:8]
    return f"{out}.partial/{base}-{digest}"


def load_model_checkpoint(args):
    """--checkpoint's contents (None without one), refusing flags that contradict it; sets args.method."""
    if not args.checkpoint:
        return None
    ckpt = nap.load_checkpoint(args.checkpoint)
    method = ckpt["config"].get("method")
    if args.method not in (None, method):
        raise ValueError(f"--method {args.method}: {args.checkpoint} holds a {method} model; drop --method "
                         f"(the checkpoint says which method it is)")
    args.method = method
    if args.vision_weights and ckpt["config"].get("finetune") == "vision":
        raise ValueError(f"--vision-weights {args.vision_weights}: {args.checkpoint} ({method}) carries its own "
                         f"fine-tuned image encoder, which would replace those weights; drop --vision-weights "
                         f"(or evaluate the weights alone: --vision-weights without --checkpoint)")
    return ckpt


# ---------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    world = runtime.init_world(args.device)
    device = runtime.resolve_device(args.device, world)
    args.precision = runtime.resolve_precision(args.precision, device, args.eps if args.attack != "none" and world.main else None)
    ckpt = load_model_checkpoint(args)
    saved = (ckpt or {}).get("backbone", {})
    arch = args.arch or (ckpt.get("arch") if ckpt else None) or "ViT-B/16"
    vision = args.vision_weights or saved.get("vision_weights")
    if ckpt:
        runtime.check_backbone(saved, arch, vision)
    if args.dataset is None:
        import synthetic
        args.dataset = list(synthetic.TASKS) if arch == "toy" else list(data.PAPER_EVAL)
    name = model_name(args.checkpoint)
    with contextlib.ExitStack() as held:
        if world.main:  # before any work: one run at a time (check_paths refused the user's files)
            held.enter_context(runtime.exclusive(args.out))
            table = table_path(args.out)
        results = evaluate_all(args, ckpt, arch, vision, read_results(args.out), world, device)
        if world.main:
            write_table(table, name, {d: results[d] for d in args.dataset}, args)
            print(f"results: {args.out}")
    runtime.close_world(world)


def evaluate_all(args, ckpt, arch, vision, results, world, device) -> dict:
    """Every --dataset not already in results (reused when nothing changed) -> results, written to --out after each."""
    datasets = {d: data.subsample_classes(data.build_dataset(d, args.data_root, "test"), args.subsample_classes)
                for d in args.dataset}  # fail fast
    backbone = runtime.load_backbone(arch, device, args.precision, vision)
    surrogate = load_surrogate(args, arch, backbone, device) if args.attack == "transfer" else None
    model_id = {"checkpoint": os.path.abspath(args.checkpoint) if ckpt else None, "method": args.method,
                "arch": arch, "vision_weights": os.path.abspath(vision) if vision else None}
    contents_model = {"checkpoint_sha256": runtime.sha256_file(args.checkpoint) if ckpt else None,
                      "backbone": runtime.backbone_record(arch, vision)}
    if surrogate:
        contents_model["surrogate"] = surrogate[2]
    for dataset in args.dataset:
        data_id = data_identity(dataset, args)
        identity = {"model": {**model_id, "template": args.template}, "settings": settings(args), "data": data_id}
        contents = {**contents_model, "data": data.fingerprint(datasets[dataset])}
        if previous(results, dataset, identity, contents, args.out):
            continue
        partial_dir = partial_folder(args.out, dataset, data_id)
        open_partial(partial_dir, {"identity": identity, "contents": contents}, world)
        result = evaluate_dataset(dataset, datasets[dataset], backbone, ckpt, args, world, device, partial_dir,
                                  surrogate)
        result.update(checkpoint=args.checkpoint, arch=arch, identity=identity, contents=contents)
        if world.main:
            results[dataset] = result
            runtime.write_json(results, args.out)
            robust = "" if result["robust"] is None else \
                f", robust {shown(result, 'robust')} ({args.attack}, eps {args.eps * 255:.4g}/255)"
            tqdm.write(f"{dataset}: clean {shown(result, 'clean')}{robust}")
        if world.size > 1:
            torch.distributed.barrier()
        if world.main:
            shutil.rmtree(partial_dir, ignore_errors=True)
            if not os.listdir(os.path.dirname(partial_dir)):
                os.rmdir(os.path.dirname(partial_dir))
    return results


def shown(result: dict, key: str) -> str:
    """'50.00 [43.1, 56.9]': an accuracy with its interval."""
    low, high = result[f"{key}_ci95"]
    return f"{result[key]:.2f} [{low:.1f}, {high:.1f}]"


def write_table(path: str, name: str, shown_results: dict, args):
    """The markdown table of these results, under a line naming the model, attack, PGD's scoring and n; printed too."""
    scoring = f" (scored on {'any iterate' if args.pgd_score == 'any' else 'the last iterate'})" \
        if args.attack in ("pgd", "cw", "tpgd") else ""
    if args.attack == "transfer":
        di = f", diverse inputs p={args.diverse_inputs:g}" if args.diverse_inputs else ""
        scored = "the clean or the crafted image" if args.pgd_score == "any" else "the crafted image alone"
        scoring = f" from {model_name(args.surrogate)}{di} (scored on {scored})"
    ns = sorted({r["n_samples"] for r in shown_results.values()})
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]} to {ns[-1]}"
    header = (f"{name}, attack {args.attack}{scoring}, eps {args.eps * 255:.4g}/255, steps {args.steps}, "
              f"n {n} images per dataset" + ("" if args.subsample_classes == "all" else
                                              f" of the {args.subsample_classes} classes") +
              "; accuracy in % [95% Wilson interval]")
    table = runtime.markdown_table(shown_results)
    with open(path, "w") as f:
        f.write(f"{TABLE_MARK} {os.path.basename(args.out)}, rewritten by each run -->\n{header}\n\n{table}\n")
    print(f"{header}\n\n{table}")


if __name__ == "__main__":
    cmdline.run_cli(main)
