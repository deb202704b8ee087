"""End to end: PGD evaluation of a train.py checkpoint, evaluate.py's path (text features once, attacks.pgd with
early stopping) against the peers' (the text encoder in every forward, every point every step, the last iterate
scored), on the same images, batch by batch in turns."""
import torch

import attacks
import data
import nap
import runtime
from bench_common import naive_pgd, our_logits, peers_logits, timed


class Counted:
    """A logits function that counts the images it sees with gradients on (forward+backward passes of an
    attack step) and off (forward-only passes)."""

    def __init__(self, fn):
        self.fn, self.grad_images, self.forward_images = fn, 0, 0

    def __call__(self, images):
        if torch.is_grad_enabled():
            self.grad_images += len(images)
        else:
            self.forward_images += len(images)
        return self.fn(images)


def load_trained(checkpoint, dataset, device, precision):
    """A train.py checkpoint on its backbone (runtime.load_backbone with the checkpoint's arch), twice: ours
    frozen as evaluate.py freezes it, the peers' with the prompts left trainable as the peers' models are.
    -> (ours, peers, test set with eval_transform, dataset name); dataset None: the one it was trained on."""
    ckpt = nap.load_checkpoint(checkpoint)
    if not ckpt.get("arch"):
        raise ValueError(f"{checkpoint} names no backbone (no 'arch' entry); give a checkpoint written by train.py")
    name = dataset or ckpt.get("args", {}).get("dataset")
    if name is None:
        raise ValueError(f"{checkpoint} does not record its training dataset; name one with --dataset")
    test = data.build_dataset(name, None, "test")
    backbone = runtime.load_backbone(ckpt["arch"], device, precision)
    test.transform = data.eval_transform(backbone.visual.input_resolution)
    ours, peers = (nap.from_checkpoint(backbone, ckpt, classnames=test.classnames, transfer=True).to(device).eval()
                   for _ in range(2))
    return ours.requires_grad_(False), peers, test, name


def eval_subset(n, n_samples, seed):
    """The test-set indices evaluate.py scores: all n, or the seeded random subset of n_samples (sorted)."""
    if n_samples is None or n_samples >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_samples].tolist())


def our_batch(fn, x, y, eps, alpha, steps, seed, early_stop=True):
    """evaluate.evaluate_batch's PGD: clean prediction, attacks.pgd from its random start (seed), the robust count.
    -> (clean predictions, predictions on the returned images), [B] each."""
    with torch.no_grad():
        clean = fn(x).argmax(1)
    x_adv = attacks.pgd(fn, x, y, eps, alpha, steps, random_start=True, seed=seed, early_stop=early_stop)
    with torch.no_grad():
        return clean, fn(x_adv).argmax(1)


def peers_start(x, eps, seed):
    """The random start attacks.pgd draws for this seed, uniform in the eps ball around x [B, ...], in [0, 1]."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return (x + eps * (2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1)).clamp(0, 1)


def peers_batch(fn, x, y, eps, alpha, steps, seed):
    """The peers' evaluation of one batch: clean prediction, torchattacks-style PGD (every point every step, the
    last iterate) from the random start attacks.pgd draws for this seed, the robust count.
    -> (clean predictions, predictions on the last iterates), [B] each."""
    with torch.no_grad():
        clean = fn(x).argmax(1)
    x_adv = naive_pgd(fn, x, y, eps, alpha, steps, peers_start(x, eps, seed))
    with torch.no_grad():
        return clean, fn(x_adv).argmax(1)


def bench_e2e(ours_model, peers_model, dataset, indices, batch_size, eps, alpha, steps, seed, device, precision,
              early_stop=True):
    """PGD-`steps` evaluation of the images `indices` of dataset, ours (evaluate.py's path; with early_stop=False,
    the attack without early stopping) and the peers', batch by batch in turns (the first to run alternates);
    batch b is attacked with seed + b by both. Ours' time includes its one text-feature pass.
    -> {'ours'|'peers': seconds, passes, per image: clean and robust (bool [N]), clean_pred and adv_pred
    (predictions on the clean and the returned images)}, plus text_s, n, batches."""
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    load = lambda b: (torch.stack([dataset[i][0] for i in b]).to(device), torch.tensor([dataset[i][1] for i in b], device=device))
    x, y = load(batches[0][:2])  # warm-up (lazy initialisation, kernel choices), not timed
    our_batch(our_logits(ours_model, device, precision), x, y, eps, alpha, 1, seed, early_stop)
    peers_batch(peers_logits(peers_model, device, precision), x, y, eps, alpha, 1, seed)
    (text_s, ours_fn), = timed([lambda: our_logits(ours_model, device, precision)], 1, device)
    fns = {"ours": Counted(ours_fn), "peers": Counted(peers_logits(peers_model, device, precision))}
    run = {"ours": lambda x, y, s: our_batch(fns["ours"], x, y, eps, alpha, steps, s, early_stop),
           "peers": lambda x, y, s: peers_batch(fns["peers"], x, y, eps, alpha, steps, s)}
    seconds, clean, adv, labels = {"ours": text_s, "peers": 0.0}, {"ours": [], "peers": []}, {"ours": [], "peers": []}, []
    for b, idx in enumerate(batches):
        x, y = load(idx)
        labels.append(y.cpu())
        for name in ("ours", "peers") if b % 2 == 0 else ("peers", "ours"):
            (t, (c, a)), = timed([lambda: run[name](x, y, seed + b)], 1, device)
            seconds[name] += t
            clean[name].append(c.cpu())
            adv[name].append(a.cpu())
    y = torch.cat(labels)
    result = {name: dict(seconds=seconds[name], grad_images=fns[name].grad_images,
                         forward_images=fns[name].forward_images, clean_pred=torch.cat(clean[name]),
                         adv_pred=torch.cat(adv[name]),
                         clean=torch.cat(clean[name]) == y, robust=torch.cat(adv[name]) == y) for name in fns}
    result.update(text_s=text_s, n=len(indices), batches=len(batches))
    if result["ours"]["robust"].sum() > result["peers"]["robust"].sum():
        raise AssertionError(f"ours leaves {int(result['ours']['robust'].sum())} of {len(indices)} points robust, "
                             f"more than the peers' {int(result['peers']['robust'].sum())}: ours counts a point broken "
                             "once any iterate fools it, so this is a bug in one of the two paths")
    return result


def report_e2e(r, title):
    """The e2e table, then as the last line: 'e2e: ours X s, peers Y s, speed-up Z.ZZx, robust ours A.A%, peers B.B%'."""
    pct = lambda v: 100 * v.float().mean().item()
    print(f"\n{title}\n")
    print("| | wall s | image-steps (forward+backward) | forward-only image passes | clean % | robust % |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("ours", "peers"):
        o = r[name]
        print(f"| {name} | {o['seconds']:.2f} | {o['grad_images']:,} | {o['forward_images']:,} | {pct(o['clean']):.1f} | "
              f"{pct(o['robust']):.1f} |")
    ours, peers = r["ours"], r["peers"]
    flipped = int((ours["robust"] & ~peers["robust"]).sum())
    print(f"\nours: text features once ({r['text_s']:.2f} s, included); work fraction "
          f"{ours['grad_images'] / max(peers['grad_images'], 1):.3f} of the peers' image-steps; images robust for "
          f"ours but broken for the peers: {flipped}.")
    print(f"e2e: ours {ours['seconds']:.1f} s, peers {peers['seconds']:.1f} s, speed-up "
          f"{peers['seconds'] / ours['seconds']:.2f}x, robust ours {pct(ours['robust']):.1f}%, peers {pct(peers['robust']):.1f}%")
