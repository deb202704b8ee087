"""Speed figures, printed as markdown tables: one bench_* function per measurement, main() runs
them. Now: time per attack step of attacks.py against straightforward implementations.

    python bench.py            # full run (CPU, a few minutes)
    python bench.py --quick    # smoke run (seconds)
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks


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


def naive_pgd(model, x, y, eps, alpha, steps):
    """Reference PGD as commonly written (torchattacks style): every point, every step."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv


def full_batch_steps(model, x, y, eps, steps):
    """`steps` forward+backward passes on the whole batch: what any attack that never drops
    broken points (e.g. fra31's or torchattacks' APGD) pays at least."""
    for _ in range(steps):
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
    return x


def _timed(fns, repeats):
    """[(best wall time of `repeats` calls of fn(), its last result) for fn in fns], the calls
    taken in turns so that a change in machine load hits every fn alike."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            results[k] = fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return list(zip(best, results))


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
            (t_ours, x_adv), (t_naive, _) = _timed([ours, naive], repeats)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        bench_attack_step(batch=16, size=16, steps=10, repeats=1, device=args.device)
    else:
        bench_attack_step(device=args.device)


if __name__ == "__main__":
    main()
