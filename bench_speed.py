"""The speed tables, ours against the peers' way of computing, all taken in turns (bench_common.timed):

  attack   time per attack step of attacks.py against straightforward PGD/APGD (a small CNN)
  eval     PGD evaluation of a prompted CLIP per class count: ours (text features once per dataset, broken points
           dropped) against the peers' (the text encoder run inside every forward, every point attacked every step)
  train    one training step, PGD + update: ours (text features once per step) against the peers'
  text     one text-encoder pass per class count: what the peers pay at every forward
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import runtime
from bench_common import mib, naive_pgd, our_logits, peak_memory, peers_logits, prompted, random_images, timed
from bench_flops import text_flops


# ---------------------------------------------------------------------- attack steps on a small CNN

def small_cnn(size, seed=0):
    """A small conv net, (B, 3, size, size) images in [0,1] -> 10 logits, trained for about a
    second on a synthetic 10-class task (noisy copies of 10 smooth prototype images)."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=size, mode="bilinear")

    def sample(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.5 + 0.4 * (protos[y] - 0.5) + 0.25 * torch.randn(n, 3, size, size, generator=g)
        return x.clamp(0, 1), y

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(100):
        x, y = sample(64)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval().requires_grad_(False)
    return net, sample


def full_batch_steps(model, x, y, eps, steps):
    """`steps` forward+backward passes on the whole batch: what any attack that never drops
    broken points (e.g. fra31's or torchattacks' APGD) pays at least."""
    for _ in range(steps):
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
    return x


def bench_attack_step(batch=128, size=32, steps=100, eps_list=("1/255", "8/255", "16/255"),
                      repeats=5, device="cpu"):
    """Milliseconds per attack step (total time / steps) of attacks.pgd and attacks.apgd
    against straightforward versions of the same attack, on a small trained CNN. The default
    eps break none, some and all of the points, from pure overhead to the most saving."""
    net, sample = small_cnn(size)
    net = net.to(device)
    x, _ = sample(batch)
    x = x.to(device)
    with torch.no_grad():
        y = net(x).argmax(1)  # clean accuracy 100%: every point gets attacked
    rows = []
    for eps_text in eps_list:
        eps = attacks.parse_eps(eps_text)
        alpha = eps / 4
        runs = {  # name -> (ours, straightforward version)
            f"PGD-{steps} eval": (
                lambda: attacks.pgd(net, x, y, eps, alpha, steps, seed=0),
                lambda: naive_pgd(net, x, y, eps, alpha, steps)),
            f"PGD-{steps} train (early_stop=False)": (
                lambda: attacks.pgd(net, x, y, eps, alpha, steps, early_stop=False),
                lambda: naive_pgd(net, x, y, eps, alpha, steps)),
            f"APGD-CE-{steps}": (
                lambda: attacks.apgd(net, x, y, eps, steps=steps),
                lambda: full_batch_steps(net, x, y, eps, steps)),
        }
        for name, (ours, naive) in runs.items():
            (t_ours, x_adv), (t_naive, _) = timed([ours, naive], repeats, device)
            with torch.no_grad():
                robust = (net(x_adv).argmax(1) == y).float().mean().item()
            rows.append((eps_text, name, 1e3 * t_ours / steps, 1e3 * t_naive / steps,
                         t_naive / t_ours, 100 * robust))
    print(f"\nTime per attack step, batch {batch} of 3x{size}x{size}, small CNN, {device}, "
          f"{torch.get_num_threads()} threads (best of {repeats}). Straightforward version: "
          "the torchattacks-style PGD loop; for APGD, full-batch forward+backward steps, "
          "a lower bound for implementations that never drop broken points.\n")
    print("| eps | attack | ours ms/step | straightforward ms/step | speed-up | robust % |")
    print("|---|---|---|---|---|---|")
    for eps_text, name, ours, naive, speedup, robust in rows:
        print(f"| {eps_text} | {name} | {ours:.2f} | {naive:.2f} | {speedup:.2f}x | {robust:.1f} |")
    return rows


# ---------------------------------------------------------------------- training: the peers' loss and ours

def peers_train_loss(model, x, y, start, eps, alpha, steps):
    """The peers' adversarial loss: PGD from `start` against model.forward, then CE of model(x_adv): a scalar."""
    x_adv = attacks.pgd(model, x, y, eps, alpha, steps, random_start=False, early_stop=False, x_init=start)
    return F.cross_entropy(model(x_adv).float(), y)


def our_train_loss(model, x, y, start, eps, alpha, steps):
    """Ours (train.AdversarialStep, loss 'adv'): text features once with their graph; PGD reuses them detached."""
    text = model.text_features()
    x_adv = attacks.pgd(lambda images: model.logits(images, text.detach()), x, y, eps, alpha, steps,
                        random_start=False, early_stop=False, x_init=start)
    return F.cross_entropy(model.logits(x_adv, text).float(), y)


def train_step(loss_fn, model, optimizer, batch, eps, alpha, steps, device, precision):
    """One update of the prompts and refiners on loss_fn(model, *batch, eps, alpha, steps); returns the loss."""
    with runtime.autocast(device, precision):
        loss = loss_fn(model, *batch, eps, alpha, steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------- the prompted-CLIP benches

def bench_eval(backbone, classes, batch, steps, eps, device, precision, repeats, compile=None):
    """PGD-`steps` evaluation (step size eps) on one batch, per class count: the peers' computation
    (naive_pgd on model.forward) against ours without and with early stopping (ours through
    torch.compile(mode=compile) if compile is a mode name). Returns one dict per class count; every
    point starts correctly classified (labels = our clean predictions)."""
    rows = []
    for n in classes:
        model = prompted(backbone, n)
        x = random_images(model, batch, device)
        (t_text, ours), = timed([lambda: our_logits(model, device, precision)], 1, device)
        ours = torch.compile(ours, mode=compile) if compile else ours
        peers = peers_logits(model, device, precision)
        with torch.no_grad():
            y = ours(x).argmax(1)
        grad_images = [0]

        def counted(images):  # ours, counting the images that take a gradient step
            grad_images[0] += len(images) if torch.is_grad_enabled() else 0
            return ours(images)

        runs = [lambda: naive_pgd(peers, x, y, eps, eps, steps),
                lambda: attacks.pgd(ours, x, y, eps, eps, steps, early_stop=False, seed=0),
                lambda: attacks.pgd(counted, x, y, eps, eps, steps, seed=0)]
        if compile:  # compile (and recompile for the shrinking batches) before the clock starts
            runs[1](), runs[2]()
            grad_images[0] = 0
        (t_peers, _), (t_full, _), (t_ours, x_adv) = timed(runs, repeats, device)
        with torch.no_grad():
            robust = (ours(x_adv).argmax(1) == y).float().mean().item()
        memory = [peak_memory(lambda: naive_pgd(peers, x, y, eps, eps, 1), device, model),
                  peak_memory(lambda: attacks.pgd(ours, x, y, eps, eps, 1, early_stop=False), device, model)]
        rows.append(dict(classes=n, batch=batch, steps=steps, text_s=t_text, peers_s=t_peers, full_s=t_full,
                         ours_s=t_ours, work=grad_images[0] / (repeats * batch * steps), robust=100 * robust,
                         peers_mem=memory[0], ours_mem=memory[1]))
    return rows


def bench_train(backbone, classes, batch, steps, eps, device, precision, repeats):
    """Seconds per training step (PGD-`steps` from a random start + one SGD update of prompts and refiners)
    per class count, the peers' loss against ours; one dict per class count."""
    rows = []
    for n in classes:
        model = prompted(backbone, n).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
        x = random_images(model, batch, device)
        y = torch.arange(batch, device=device) % n
        start = (x + eps * (2 * random_images(model, batch, device, seed=1) - 1)).clamp(0, 1)
        step = {name: (lambda fn=fn: train_step(fn, model, optimizer, (x, y, start), eps, eps, steps, device, precision))
                for name, fn in (("peers", peers_train_loss), ("ours", our_train_loss))}
        (t_peers, _), (t_ours, _) = timed([step["peers"], step["ours"]], repeats, device)
        rows.append(dict(classes=n, batch=batch, steps=steps, peers_s=t_peers, ours_s=t_ours,
                         peers_mem=peak_memory(step["peers"], device, model),
                         ours_mem=peak_memory(step["ours"], device, model)))
    return rows


def bench_text(backbone, classes, device, precision, repeats):
    """Seconds of one text-encoder forward (no graph) per class count, with its FLOPs; one dict per count."""
    rows = []
    for n in classes:
        model = prompted(backbone, n)

        def encode():
            with torch.no_grad(), runtime.autocast(device, precision):
                return model.text_features()
        (seconds, _), = timed([encode], repeats, device)
        rows.append(dict(classes=n, seconds=seconds, flops=text_flops(model)))
    return rows


# ---------------------------------------------------------------------- reports

def report_eval(rows, eps_text, memory_label):
    """The evaluation table: one row per class count, throughput, speed-ups, work fraction, memory."""
    print(f"\nEvaluation, PGD-{rows[0]['steps']} at eps {eps_text} (step eps), batch {rows[0]['batch']}; "
          "throughput in images x steps per second. peers: text encoder in every forward, every point every "
          "step (naive_pgd); ours-full: cached text features, attacks.pgd(early_stop=False); ours: cached + "
          "broken points dropped. text: our once-per-dataset text-feature pass (not in the times). "
          "work: fraction of image-steps ours spent.\n")
    print(f"| classes | text s | peers img*step/s | ours-full img*step/s | ours img*step/s | cache speed-up | "
          f"total speed-up | early-stop gain | work | robust % | {memory_label} peers | {memory_label} ours |")
    print("|---:" * 12 + "|")
    for r in rows:
        rate = lambda t: r["batch"] * r["steps"] / t
        print(f"| {r['classes']} | {r['text_s']:.3f} | {rate(r['peers_s']):,.1f} | {rate(r['full_s']):,.1f} | "
              f"{rate(r['ours_s']):,.1f} | {r['peers_s'] / r['full_s']:.2f}x | {r['peers_s'] / r['ours_s']:.2f}x | "
              f"{r['full_s'] / r['ours_s']:.2f}x | {r['work']:.2f} | {r['robust']:.1f} | "
              f"{mib(r['peers_mem'])} | {mib(r['ours_mem'])} |")


def report_train(rows, memory_label):
    """The training-step table: one row per class count."""
    print(f"\nTraining step, PGD-{rows[0]['steps']} + SGD update, batch {rows[0]['batch']}. peers: text encoder in "
          "every forward; ours: text features once per step (train.AdversarialStep).\n")
    print(f"| classes | peers s/step | ours s/step | peers img/s | ours img/s | speed-up | "
          f"{memory_label} peers | {memory_label} ours |")
    print("|---:" * 8 + "|")
    for r in rows:
        print(f"| {r['classes']} | {r['peers_s']:.3f} | {r['ours_s']:.3f} | {r['batch'] / r['peers_s']:,.1f} | "
              f"{r['batch'] / r['ours_s']:,.1f} | {r['peers_s'] / r['ours_s']:.2f}x | "
              f"{mib(r['peers_mem'])} | {mib(r['ours_mem'])} |")


def report_text(rows):
    """The text-encoder table: one row per class count, seconds and GFLOP/s."""
    print("\nOne text-encoder forward (no graph): what the peers add to every attack forward.\n")
    print("| classes | seconds | GFLOP | achieved GFLOP/s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['classes']} | {r['seconds']:.3f} | {r['flops'] / 1e9:,.1f} | {r['flops'] / 1e9 / r['seconds']:,.1f} |")
