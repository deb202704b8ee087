"""Speed and memory figures, printed as markdown tables; one bench_* function per measurement:

  attack   time per attack step of attacks.py against straightforward PGD/APGD (a small CNN)
  eval     PGD evaluation of a prompted CLIP at 10/100/1000 classes: ours (text features once per
           dataset, broken points dropped) against the peers' computation (the text encoder run
           inside every forward, every point attacked every step)
  train    one training step, PGD-2 + update: ours (text features once per step) against the peers'
  text     one text-encoder pass per class count: what the peers pay at every forward
  flops    FLOPs of the image attack step, analytic and counted; MFU; the projected wall time of
           the paper's PGD-100 protocol
  profile  one attack step by part (attention, MLPs, refiners, prompt handling, casts, norms)
  methods  one training step per method as train.py takes it (advmaple, nap, tecoa, fare, each with its
           recipe's loss, attack and optimiser): trained parameters, optimizer state, seconds, image
           passes, peak memory
  e2e      PGD-100 evaluation of a trained checkpoint: evaluate.py's path against the peers'
  (suite)  precision: PGD-100 robust accuracy of one model in fp16 and in fp32 on the same images, within 0.5 points
           (--gpu-suite only; a checkpoint given with --checkpoint, else a prototype classifier on random weights)

    python bench.py --quick       # tiny CLIP on the CPU (one thread), under 2 minutes
    python bench.py               # ViT-B/16-sized CLIP (random weights: same speed) on the GPU, fp16
    python bench.py --gpu-suite --out gpu-suite.md   # every pending GPU figure, one markdown block, < 8 min
    python bench.py --compile     # ours through torch.compile (--compile reduce-overhead: + CUDA graphs)
    python bench.py --device cpu --threads 1 --eval-batch 8 --eval-steps 2 --train-batch 8  # ViT-B/16 on a CPU
    python bench.py --bench e2e --checkpoint runs/nap-synthetic/checkpoint.pt --n-samples 300
    python bench.py --bench methods --device cpu --threads 2 --batch 2   # ViT-B/16, one step per method on a CPU

Times are the best of --repeats runs taken in turns (CUDA: each run between synchronizes).
Memory is torch.cuda.max_memory_allocated on CUDA; on the CPU, a proxy: the peak bytes of the
tensors autograd keeps for backward (activations, weights excluded).
"""
import collections
import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import attacks
import data
import nap
import runtime
import train
from clip.model import CLIP

# CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
#      vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHS = {"vit-b/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
         "tiny": (64, 64, 4, 128, 16, 77, 49408, 64, 1, 2)}

# The paper's PGD-100 protocol: test images and classes of ImageNet and the 9 transfer datasets (CoOp splits)
PROTOCOL = {"imagenet": (50000, 1000), "caltech101": (2465, 100), "dtd": (1692, 47), "eurosat": (8100, 10),
            "oxford_pets": (3669, 37), "fgvc_aircraft": (3333, 100), "food101": (30300, 101),
            "stanford_cars": (8041, 196), "sun397": (19850, 397), "ucf101": (3783, 101)}

# Dense bf16 peak TFLOP/s of the GPUs this may run on, by a part of the device name (first match wins)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


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


def naive_pgd(model, x, y, eps, alpha, steps, start=None):
    """Reference PGD as torchattacks writes it: from `start` (default: a uniform point of the eps ball
    from torch's RNG), every point every step, mean cross-entropy, the last iterate returned."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) if start is None else start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x + (x_adv.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def full_batch_steps(model, x, y, eps, steps):
    """`steps` forward+backward passes on the whole batch: what any attack that never drops
    broken points (e.g. fra31's or torchattacks' APGD) pays at least."""
    for _ in range(steps):
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
    return x


def _sync(device):
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fns, repeats, device="cpu"):
    """[(best wall time of `repeats` calls of fn(), its last result) for fn in fns], the calls
    taken in turns so that a change in machine load hits every fn alike; on CUDA each call is
    bracketed by synchronize, so the time is the device's."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            results[k] = fn()
            _sync(device)
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
            (t_ours, x_adv), (t_naive, _) = _timed([ours, naive], repeats, device)
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


# ---------------------------------------------------------------------- prompted CLIP: ours and the peers'

def random_clip(arch, device, precision="fp32", seed=0):
    """A CLIP of size `arch` (ARCHS) with random weights, frozen, on device, in the run's precision: saved
    to a temporary file and loaded by runtime.load_backbone, as train.py and evaluate.py load theirs.
    As fast as a trained one."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"random-{arch.replace('/', '')}.pt")
        torch.save(CLIP(*ARCHS[arch]).state_dict(), path)
        return runtime.load_backbone(path, device, precision)


def prompted(backbone, n_classes, seed=0):
    """NAP-Tuning (preset 'nap', depth capped at the backbone's layers) over n_classes names 'class 0', ..."""
    depth = min(nap.PRESETS["nap"].depth, backbone.transformer.layers, backbone.visual.transformer.layers)
    torch.manual_seed(seed)
    model = nap.PromptedCLIP(backbone, [f"class {i}" for i in range(n_classes)], nap.make_config("nap", depth=depth))
    return model.to(backbone.logit_scale.device).eval()


def _autocast(fn, device, precision):
    """fn under runtime.autocast, logits returned in float32 (as evaluate.py runs them)."""
    def run(images):
        with runtime.autocast(device, precision):
            return fn(images).float()
    return run


def peers_logits(model, device, precision):
    """The peers' classifier, images [B,3,R,R] -> logits [B,C]: model.forward, the text encoder run at every call."""
    return _autocast(model, device, precision)


def our_logits(model, device, precision):
    """Ours, images [B,3,R,R] -> logits [B,C]: text features computed once, now, and reused."""
    with runtime.autocast(device, precision):
        cached = model.logits_fn()
    return _autocast(cached, device, precision)


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


# ---------------------------------------------------------------------- memory

class _Held:
    """A tensor autograd keeps for backward; tells its _SavedBytes when autograd lets go of it."""

    def __init__(self, tensor, owner, key, nbytes):
        self.tensor, self.owner, self.key, self.nbytes = tensor, owner, key, nbytes

    def __del__(self):
        self.owner.release(self.key, self.nbytes)


class _SavedBytes:
    """saved_tensors_hooks bookkeeping: bytes of the storages autograd holds now, and their peak."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs, self.now, self.peak = {}, 0, 0

    def pack(self, t):
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self.exclude:
            return t
        if key not in self.refs:
            self.refs[key], self.now = 0, self.now + nbytes
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        return _Held(t.detach(), self, key, nbytes)  # t itself would hold its grad_fn: a cycle that keeps the graph

    def unpack(self, held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= nbytes


def peak_memory(fn, device, model):
    """Peak bytes while fn() runs: torch.cuda.max_memory_allocated on CUDA (weights included); on the CPU
    the peak of the tensors autograd keeps for backward, each storage once, model's weights excluded."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device)
    saved = _SavedBytes([*model.parameters(), *model.buffers()])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        fn()
    return saved.peak


# ---------------------------------------------------------------------- FLOPs

def image_flops(model, batch=1):
    """Matmul FLOPs (2 per multiply-add) of one attack step of model.logits on `batch` images with cached
    text features: (forward, backward to the input). Counted: the patch-embedding conv, per block the
    qkv / output / MLP projections and the two attention products over all tokens (CLS, patches,
    prompts), the refiners on the non-prompt tokens, the head and the logits. Not counted: norms,
    softmax, activations, additions (<1%), and the text-to-visual prompt projections, which
    logits_fn() computes once for all steps. Backward: no weight gradients are needed, so each
    projection costs its forward once more (the gradient of its input); the attention products
    twice (gradients of both operands)."""
    visual, cfg = model.clip.visual, model.cfg
    d, patch = visual.conv1.out_channels, visual.conv1.kernel_size[0]
    patches, layers, embed = visual.positional_embedding.shape[0] - 1, visual.transformer.layers, visual.proj.shape[1]
    tokens = patches + 1 + cfg.vision_ctx
    linear = patches * 3 * patch ** 2 * d + layers * tokens * 12 * d * d + d * embed + embed * len(model.classnames)
    if cfg.refine in ("vision", "both"):
        hidden = int(round(cfg.refiner_hidden * d))
        linear += (cfg.depth - 1) * (tokens - cfg.vision_ctx) * 2 * d * hidden
    attention = layers * 2 * tokens * tokens * d
    return 2 * batch * (linear + attention), 2 * batch * (linear + 2 * attention)


def text_flops(model):
    """Matmul FLOPs of one text-encoder forward over all the model's classes (attention counted dense,
    as the peers' kernels compute it; a causal kernel may skip up to half of those products)."""
    text, cfg = model.clip.transformer, model.cfg
    d, length, embed = text.width, model.clip.context_length, model.clip.text_projection.shape[1]
    per_class = text.layers * (length * 12 * d * d + 2 * length * length * d) + d * embed
    if cfg.refine in ("text", "both"):
        per_class += (cfg.depth - 1) * (length - cfg.text_ctx) * 2 * d * int(round(cfg.refiner_hidden * d))
    return 2 * len(model.classnames) * per_class


def counted_flops(fn):
    """FLOPs torch.utils.flop_counter counts while fn() runs, attention in its plain (math) form so that
    every product is seen: an int."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def attack_step_counted(model, batch, device):
    """(forward, backward) FLOPs counted for one attack step of model.logits_fn() on `batch` random images."""
    fn = model.logits_fn()
    x = torch.rand(batch, 3, model.clip.visual.input_resolution, model.clip.visual.input_resolution, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        forward = counted_flops(lambda: fn(x))
    x.requires_grad_(True)
    total = counted_flops(lambda: torch.autograd.grad(F.cross_entropy(fn(x), y), x))
    return forward, total - forward


# ---------------------------------------------------------------------- the prompted-CLIP benches

def _images(model, batch, device, seed=0):
    res = model.clip.visual.input_resolution
    return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(seed)).to(device)


def bench_eval(backbone, classes, batch, steps, eps, device, precision, repeats, compile=None):
    """PGD-`steps` evaluation (step size eps) on one batch, per class count: the peers' computation
    (naive_pgd on model.forward) against ours without and with early stopping (ours through
    torch.compile(mode=compile) if compile is a mode name). Returns one dict per class count; every
    point starts correctly classified (labels = our clean predictions)."""
    rows = []
    for n in classes:
        model = prompted(backbone, n)
        x = _images(model, batch, device)
        (t_text, ours), = _timed([lambda: our_logits(model, device, precision)], 1, device)
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
        (t_peers, _), (t_full, _), (t_ours, x_adv) = _timed(runs, repeats, device)
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
        x = _images(model, batch, device)
        y = torch.arange(batch, device=device) % n
        start = (x + eps * (2 * _images(model, batch, device, seed=1) - 1)).clamp(0, 1)
        step = {name: (lambda fn=fn: train_step(fn, model, optimizer, (x, y, start), eps, eps, steps, device, precision))
                for name, fn in (("peers", peers_train_loss), ("ours", our_train_loss))}
        (t_peers, _), (t_ours, _) = _timed([step["peers"], step["ours"]], repeats, device)
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
        (seconds, _), = _timed([encode], repeats, device)
        rows.append(dict(classes=n, seconds=seconds, flops=text_flops(model)))
    return rows


def protocol_seconds(image_steps_per_s, text_s_per_class, step_flops, forward_flops, steps=100, work=1.0):
    """Projected seconds of PGD-`steps` on PROTOCOL: sum_d N_d (work * steps + 4 f) / R + sum_d C_d t_c, where
    R = image-steps per second, f = forward / (forward + backward) FLOPs (4 forward-only passes per image:
    the clean prediction, PGD's first and last, the robust count), t_c = text-encoder seconds per class."""
    per_image = work * steps + 4 * forward_flops / step_flops
    return sum(n * per_image / image_steps_per_s + c * text_s_per_class for n, c in PROTOCOL.values())


# ---------------------------------------------------------------------- profile of one attack step

CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::type_as"}
PROMPT_OPS = {"aten::cat", "aten::expand", "aten::slice", "aten::narrow", "aten::unsqueeze", "aten::select",
              "aten::split", "aten::unbind", "aten::stack"}


def labelled_parts(model):
    """[(module or (object, method name), label)]: the parts of a prompted ViT CLIP's image path the profile
    tells apart. Methods are listed by name, so that either version of nap.py (visual.embed or
    model.embed_patches, with or without model.image_embedding) is covered where it exists."""
    visual = model.clip.visual
    parts = [((visual, "embed"), "patch embedding"), ((model, "embed_patches"), "patch embedding"),
             ((visual, "head"), "head, logits, loss"), (visual.ln_pre, "layer norms")]
    for block in visual.transformer.resblocks:  # innermost label wins: the block's own label keeps its residual adds
        parts += [(block, "residual adds"), (block.attn, "attention"), (block.mlp, "MLP"), (block.ln_1, "layer norms"),
                  (block.ln_2, "layer norms")]
    parts += [(m, "refiners") for m in getattr(model, "vision_refiners", [])]
    parts += [((model, "vision_prompts"), "visual prompts (maple projection)")]
    return [(p, label) for p, label in parts if not isinstance(p, tuple) or hasattr(*p)]


class Labels:
    """While open, runs each labelled part inside torch.profiler.record_function('part:<label>') (module hooks,
    instance-level wrappers of methods); closing removes every hook and wrapper."""

    def __init__(self, parts):
        self.parts, self.undo = parts, []

    def __enter__(self):
        for part, label in self.parts:
            if isinstance(part, tuple):
                obj, name = part
                method = getattr(obj, name)

                def wrapped(*args, _method=method, _label=label, **kwargs):
                    with torch.profiler.record_function(f"part:{_label}"):
                        return _method(*args, **kwargs)
                setattr(obj, name, wrapped)
                self.undo.append(lambda obj=obj, name=name: delattr(obj, name))
            else:
                ranges = []
                pre = part.register_forward_pre_hook(
                    lambda m, a, label=label, ranges=ranges: ranges.append(torch.profiler.record_function(f"part:{label}").__enter__()))
                post = part.register_forward_hook(lambda m, a, out, ranges=ranges: ranges.pop().__exit__(None, None, None))
                self.undo += [pre.remove, post.remove]
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.undo):
            undo()
        self.undo = []


MATMULS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}


def _is_cast(e):
    """A cast or copy that is not part of a matmul's own work (addmm copies its bias into the output)."""
    if e.name not in CASTS:
        return False
    a = e.cpu_parent
    while a is not None:
        if a.name in MATMULS:
            return False
        a = a.cpu_parent
    return True


def _op_label(name):
    """The label of an op outside every labelled part, by its name."""
    if name in PROMPT_OPS:
        return "prompt handling (cat, expand, slices)"
    if name in CASTS:
        return "casts and copies (outside the parts)"
    return "other (normalisation, logits, loss, elementwise)"


def step_profile(events, device_time):
    """Profiler events of attack steps -> ({label: [forward us, backward us, of which casts/copies us]} in self times,
    {label: Counter of (phase 'forward' or 'backward', op name)}). A forward op takes the label of its innermost
    labelled range (else its name's); a backward op that of the forward op autograd recorded it for (same sequence
    number; a no-op cast such as .float() before an op shares the op's number, so casts name a node last)."""
    key = "self_device_time_total" if device_time else "self_cpu_time_total"
    by_seq, table, counts = {}, {}, {}

    def forward_label(e):
        a = e.cpu_parent
        while a is not None:
            if a.name.startswith("part:"):
                return a.name[5:]
            a = a.cpu_parent
        return None

    def backward_node(e):  # the autograd node an op runs in, or None for a forward op
        node = None
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function"):
                node = e
            e = e.cpu_parent
        return node

    ops = [(e, backward_node(e)) for e in sorted(events, key=lambda e: e.time_range.start)
           if e.device_type == torch.autograd.DeviceType.CPU and not e.name.startswith("part:")]
    for casts in (False, True):  # forward ops first: their sequence numbers name the backward ops
        for e, node in ops:
            if node is None and e.sequence_nr >= 0 and (e.name in CASTS) == casts:
                by_seq.setdefault(e.sequence_nr, forward_label(e) or _op_label(e.name))
    for e, node in ops:
        if node is not None:
            label, phase = by_seq.get(node.sequence_nr, "other (normalisation, logits, loss, elementwise)"), 1
        else:
            label, phase = forward_label(e) or _op_label(e.name), 0
        row = table.setdefault(label, [0.0, 0.0, 0.0])
        row[phase] += getattr(e, key)
        if _is_cast(e):
            row[2] += getattr(e, key)
        counts.setdefault(label, collections.Counter())[("forward", "backward")[phase], e.name] += 1
    return table, counts


def bench_profile(backbone, classes, batch, device, precision, steps=2):
    """torch.profiler over `steps` attack steps (forward + input-gradient backward of cross-entropy, as
    attacks.pgd takes them) of ours (nap preset, text features cached) after one warm-up step.
    -> (times as step_profile gives them, per step; wall ms per step; op counts of all steps, by label)."""
    model = prompted(backbone, classes)
    fn = our_logits(model, device, precision)
    x, y = _images(model, batch, device), torch.arange(batch, device=device) % classes

    def step():
        x_in = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(fn(x_in), y, reduction="none").sum(), x_in)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with Labels(labelled_parts(model)):
        step()
        _sync(device)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            wall = (time.perf_counter() - start) / steps
    table, counts = step_profile(prof.events(), device.type == "cuda")
    return {label: [v / steps for v in row] for label, row in table.items()}, 1e3 * wall, counts


def report_profile(table, wall_ms, title):
    total = sum(f + b for f, b, _ in table.values())
    print(f"\n{title}\n")
    print("| part | forward ms | backward ms | total ms | share | of which casts/copies ms (outside matmuls) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (f, b, c) in sorted(table.items(), key=lambda kv: -sum(kv[1][:2])):
        print(f"| {label} | {f / 1e3:.2f} | {b / 1e3:.2f} | {(f + b) / 1e3:.2f} | {100 * (f + b) / total:.1f}% | {c / 1e3:.2f} |")
    print(f"| **sum of self times** | {sum(r[0] for r in table.values()) / 1e3:.2f} | "
          f"{sum(r[1] for r in table.values()) / 1e3:.2f} | {total / 1e3:.2f} | 100% | "
          f"{sum(r[2] for r in table.values()) / 1e3:.2f} |")
    print(f"\nWall time per profiled step: {wall_ms:.1f} ms (profiler overhead included).")


# ---------------------------------------------------------------------- end to end: a trained checkpoint

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
    (text_s, ours_fn), = _timed([lambda: our_logits(ours_model, device, precision)], 1, device)
    fns = {"ours": Counted(ours_fn), "peers": Counted(peers_logits(peers_model, device, precision))}
    run = {"ours": lambda x, y, s: our_batch(fns["ours"], x, y, eps, alpha, steps, s, early_stop),
           "peers": lambda x, y, s: peers_batch(fns["peers"], x, y, eps, alpha, steps, s)}
    seconds, clean, adv, labels = {"ours": text_s, "peers": 0.0}, {"ours": [], "peers": []}, {"ours": [], "peers": []}, []
    for b, idx in enumerate(batches):
        x, y = load(idx)
        labels.append(y.cpu())
        for name in ("ours", "peers") if b % 2 == 0 else ("peers", "ours"):
            (t, (c, a)), = _timed([lambda: run[name](x, y, seed + b)], 1, device)
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


# ---------------------------------------------------------------------- one training step per method, as train.py takes it

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
    x, y = _images(model, n, device), torch.arange(n, device=device) % classes
    noise = 2 * _images(model, n, device, seed=1) - 1  # [-1, 1], as train.SeededViews draws it
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
            times = [_timed([run], 1, device)[0][0] for _ in range(repeats)]
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
              f"{r['seconds']:.3f} | {r['batch'] / r['seconds']:,.2f} | {_mib(r['memory'])} |")


# ---------------------------------------------------------------------- attack precision: 16 bits against fp32

FP32_SLOWDOWN = 5.0  # an fp32 image-step's time over a 16-bit one's on an H100 [C]: 67 against 989 TFLOP/s dense
                     # peak (no tensor cores: TF32 is off by default), at a higher share of the peak


def near_duplicates(model, n, device, seed=0):
    """n images [n, 3, R, R] in [0, 1]: one random image plus uniform noise, its amplitude rising geometrically from
    4/255 to 128/255 across the images [C]. A random CLIP's features of unrelated images differ by little, so these
    differ by about what an attack changes: each can be a class of its own, some within eps of another, some not."""
    spread = torch.logspace(2, 7, n, base=2).view(-1, 1, 1, 1).to(device) / 255
    return (_images(model, 1, device, seed) + spread * (2 * _images(model, n, device, seed + 1) - 1)).clamp(0, 1)


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


# ---------------------------------------------------------------------- the GPU suite

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


def bench_step(model, batch, steps, device, precision, repeats, compile_backend=None):
    """Image-steps per second of the attack step alone (attacks.pgd without early stopping, every point every step)
    on ours' cached logits, eager or through torch.compile(backend); compiled once before the clock starts.
    -> dict(rate, peak bytes or None, compile seconds)."""
    fn = our_logits(model, device, precision)
    compile_s = 0.0
    if compile_backend:
        fn = torch.compile(fn, backend=compile_backend)
    x, y = _images(model, batch, device), torch.arange(batch, device=device) % len(model.classnames)
    attack = lambda: attacks.pgd(fn, x, y, 1 / 255, 1 / 255, steps, early_stop=False, seed=0)
    (compile_s, _), = _timed([attack], 1, device)  # warm-up, and compilation where compiled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    (seconds, _), = _timed([attack], repeats, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(rate=batch * steps / seconds, peak=peak, compile_s=compile_s if compile_backend else 0.0)


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
    s = SUITES[size]
    text = io.StringIO()
    ok, start = True, time.monotonic()

    def save():
        if out:
            with open(out, "w") as f:
                f.write(text.getvalue())

    with contextlib.redirect_stdout(_Tee(sys.stdout, text)):
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
        took, state = {}, {}
        peak = peak_tflops or default_peak(device)
        memory_label = "peak MiB" if device.type == "cuda" else "saved MiB"

        def part_text():
            state["text"] = bench_text(backbone, s.classes, device, precision, s.repeats)
            report_text(state["text"])

        def part_eval():
            state["eval"] = bench_eval(backbone, s.classes, s.eval_batch, s.eval_steps, 1 / 255, device, precision, s.repeats)
            report_eval(state["eval"], "1/255", memory_label)

        def step_rows(rows):
            text_rows = state.get("text") or bench_text(backbone, [max(s.classes)], device, precision, 1)
            text_per_class = text_rows[-1]["seconds"] / text_rows[-1]["classes"]
            print(f"\nAttack step alone (attacks.pgd without early stopping), {max(s.classes)} classes, batch "
                  f"{s.step_batch}, PGD-{s.step_steps}, best of {s.repeats}; MFU against {peak or '?'} TFLOP/s; the "
                  "paper's PGD-100 protocol (131,233 images) projected at this rate, every image all 100 steps (w = 1) "
                  "and half of them (w = 0.5).\n")
            print("| attack step | image-steps/s | TFLOP/s | MFU | peak MiB | compile s | PGD-100 protocol, w = 1 | w = 0.5 |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for name, r in rows:
                achieved = r["rate"] * (forward + backward) / 1e12
                mfu = f"{100 * achieved / peak:.1f}%" if peak else "-"
                memory = _mib(r["peak"]) if r["peak"] is not None else "-"
                projected = [_duration(protocol_seconds(r["rate"], text_per_class, forward + backward, forward, work=w))
                             for w in (1.0, 0.5)]
                print(f"| {name} | {r['rate']:,.1f} | {achieved:.2f} | {mfu} | {memory} | {r['compile_s']:.0f} | "
                      f"{projected[0]} | {projected[1]} |")

        def part_step():
            step_rows([("eager", bench_step(big, s.step_batch, s.step_steps, device, precision, s.repeats))])

        def part_compile():
            step_rows([(f"torch.compile ({s.compile_backend})", bench_step(big, s.step_batch, s.step_steps, device,
                                                                         precision, s.repeats, s.compile_backend))])

        def part_flops():
            fwd, bwd = attack_step_counted(big, 2, device)
            report_flops(big, dict(batch=2, forward=fwd, backward=bwd), None, peak)

        def part_train():
            report_train(bench_train(backbone, s.classes, s.train_batch, s.train_steps, 1 / 255, device, precision,
                                     s.repeats), memory_label)

        def part_methods():
            rows = bench_methods(backbone, device, precision, s.methods_batch, s.repeats)
            report_methods(rows, precision, memory_label)
            failed = [f"{r['method']} ({r['error']})" for r in rows if r["error"]]
            if failed:
                raise RuntimeError(f"training steps failed: {'; '.join(failed)}")

        def part_profile():
            table, wall, _ = bench_profile(backbone, max(s.classes), s.profile_batch, device, precision)
            report_profile(table, wall, f"Profile of one attack step ({max(s.classes)} classes, batch "
                                        f"{s.profile_batch}; {'GPU kernel' if device.type == 'cuda' else 'CPU'} self times).")

        parts = {"text": part_text, "eval": part_eval, "step": part_step, "flops": part_flops, "train": part_train,
                 "profile": part_profile, "methods": part_methods,
                 "precision": lambda: precision_check(s, backbone, device, precision, checkpoint),
                 "compile": part_compile}
        parts = {k: v for k, v in parts.items() if k in work}
        save()
        for name, run in parts.items():
            left = s.budget_s - (time.monotonic() - start)
            if estimates[name] > left:
                print(f"\n**{name}: skipped**, budgeted {estimates[name]:.0f} s with {left:.0f} s left.")
                took[name] = "skipped"
                continue
            t0 = time.monotonic()
            try:
                run()
            except Exception as e:  # one failing part (e.g. out of memory) must not cost the others
                traceback.print_exc(file=sys.stderr)
                print(f"\n**{name}: failed**: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                ok = False
            took[name] = f"{time.monotonic() - t0:.0f}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
        print("\n| part | budget s | took s |\n|---|---:|---:|")
        for name, value in took.items():
            print(f"| {name} | {estimates[name]:.0f} | {value} |")
        print(f"\nSuite wall time {time.monotonic() - start:.0f} s (model set-up included).")
    save()
    return ok


# ---------------------------------------------------------------------- reports

def _mib(nbytes):
    return f"{nbytes / 2 ** 20:,.0f}"


def _duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report_eval(rows, eps_text, memory_label):
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
              f"{_mib(r['peers_mem'])} | {_mib(r['ours_mem'])} |")


def report_train(rows, memory_label):
    print(f"\nTraining step, PGD-{rows[0]['steps']} + SGD update, batch {rows[0]['batch']}. peers: text encoder in "
          "every forward; ours: text features once per step (train.AdversarialStep).\n")
    print(f"| classes | peers s/step | ours s/step | peers img/s | ours img/s | speed-up | "
          f"{memory_label} peers | {memory_label} ours |")
    print("|---:" * 8 + "|")
    for r in rows:
        print(f"| {r['classes']} | {r['peers_s']:.3f} | {r['ours_s']:.3f} | {r['batch'] / r['peers_s']:,.1f} | "
              f"{r['batch'] / r['ours_s']:,.1f} | {r['peers_s'] / r['ours_s']:.2f}x | "
              f"{_mib(r['peers_mem'])} | {_mib(r['ours_mem'])} |")


def report_text(rows):
    print("\nOne text-encoder forward (no graph): what the peers add to every attack forward.\n")
    print("| classes | seconds | GFLOP | achieved GFLOP/s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['classes']} | {r['seconds']:.3f} | {r['flops'] / 1e9:,.1f} | {r['flops'] / 1e9 / r['seconds']:,.1f} |")


def report_flops(model, counted, eval_row, peak_tflops):
    """The analytic FLOPs with the counted check, MFU of ours-full, and the projected PGD-100 protocol."""
    forward, backward = image_flops(model, batch=1)
    step = forward + backward
    print(f"\nFLOPs of one attack step per image ({len(model.classnames)} classes, {model.cfg.vision_ctx} visual "
          f"prompts, depth {model.cfg.depth}): analytic, and counted by FlopCounterMode (math attention) at batch "
          f"{counted['batch']}.\n")
    print("| | forward GFLOP | backward-to-input GFLOP | total GFLOP |")
    print("|---|---:|---:|---:|")
    print(f"| analytic | {forward / 1e9:.4f} | {backward / 1e9:.4f} | {step / 1e9:.4f} |")
    fwd_c, bwd_c, b = counted["forward"], counted["backward"], counted["batch"]
    fwd_a, bwd_a = image_flops(model, batch=b)
    print(f"| counted / analytic at batch {b} | {fwd_c / fwd_a:.4f} | {bwd_c / bwd_a:.4f} | "
          f"{(fwd_c + bwd_c) / (fwd_a + bwd_a):.4f} |")
    if eval_row is None:
        return
    rate = eval_row["batch"] * eval_row["steps"] / eval_row["full_s"]  # image-steps per second, ours-full
    achieved = rate * step
    mfu = f", MFU {100 * achieved / (peak_tflops * 1e12):.1f}% of {peak_tflops:g} TFLOP/s" if peak_tflops else ""
    print(f"\nAttack step (ours-full, {eval_row['classes']} classes, batch {eval_row['batch']}): {rate:,.2f} "
          f"image-steps/s x {step / 1e9:.2f} GFLOP = {achieved / 1e12:.4f} TFLOP/s{mfu}.")
    text_per_class = eval_row["text_s"] / eval_row["classes"]
    upper = protocol_seconds(rate, text_per_class, step, forward)
    at_work = protocol_seconds(rate, text_per_class, step, forward, work=eval_row["work"])
    images = sum(n for n, _ in PROTOCOL.values())
    print(f"Paper's PGD-100 protocol ({images:,} test images, 10 datasets) at this rate: at most "
          f"{_duration(upper)} (every image all 100 steps); {_duration(at_work)} at the work fraction "
          f"measured here ({eval_row['work']:.2f}, random weights).")


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


def machine(device):
    """One line naming the device, torch, threads, date and the machine's load (other processes slow CPU figures)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{name}; torch {torch.__version__}; {datetime.date.today().isoformat()}; load average {load}"


def default_peak(device):
    """Dense bf16 peak TFLOP/s of this GPU from PEAK_TFLOPS, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv=None):
    benches = ("attack", "eval", "train", "text", "flops", "profile", "methods", "e2e")
    p = runtime.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CLIP, small batches, one repeat (CPU, < 2 min)")
    p.add_argument("--bench", nargs="+", default=list(benches[:5]), choices=benches,
                   help="which figures (default: attack eval train text flops; profile, methods and e2e on request)")
    p.add_argument("--gpu-suite", nargs="?", const="h100", default=None, choices=list(SUITES),
                   help="everything BENCHMARKS.md leaves pending, one markdown block (h100: < 8 min on one H100; "
                        "cpu-check: the same parts, a few iterations; tiny: seconds on a CPU)")
    p.add_argument("--out", default=None, help="--gpu-suite: also write the markdown block here")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default=None, choices=list(runtime.DTYPES),
                   help="default: fp16 on CUDA (fp16 weights, autocast, as runtime.load_backbone casts them), else fp32")
    p.add_argument("--arch", default=None, choices=list(ARCHS), help="default: vit-b/16; tiny with --quick")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--eval-batch", type=int, default=None, help="default 256; 16 with --quick")
    p.add_argument("--eval-steps", type=int, default=None, help="default 10; 3 with --quick")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--profile-batch", type=int, default=4, help="profile: images per attack step")
    p.add_argument("--batch", type=int, default=None, help="methods: images per training step (default: each "
                                                            "recipe's, 32)")
    p.add_argument("--eps", default="1/255")
    p.add_argument("--repeats", type=int, default=None, help="default 3; 1 with --quick")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="ours' logits function through torch.compile (MODE: default, reduce-overhead = CUDA graphs, "
                        "max-autotune)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16/bf16 peak (default: by name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick, "
                                                             "steady when other processes share the cores)")
    e2e = p.add_argument_group("e2e: PGD evaluation of a trained checkpoint, ours against the peers'")
    e2e.add_argument("--checkpoint", default=None, help="a checkpoint.pt written by train.py (also the model of "
                                                         "--gpu-suite's precision part)")
    e2e.add_argument("--dataset", default=None, help="test set to attack (default: the checkpoint's training set)")
    e2e.add_argument("--n-samples", type=int, default=None, help="the seeded subset evaluate.py draws (default: all)")
    e2e.add_argument("--steps", type=int, default=100, help="PGD steps")
    e2e.add_argument("--alpha", default="1/255", help="PGD step size")
    e2e.add_argument("--batch-size", type=int, default=256, help="images per batch; batch b is attacked with seed + b")
    e2e.add_argument("--seed", type=int, default=0, help="subset draw and random starts, as evaluate.py's --seed")
    e2e.add_argument("--no-early-stop", action="store_true", help="ours without early stopping (then it scores as "
                                                                   "the peers do)")
    args = p.parse_args(argv)
    if "e2e" in args.bench and args.checkpoint is None:
        p.error("--bench e2e needs --checkpoint (a checkpoint.pt written by train.py)")
    for flag in ("steps", "batch_size", "n_samples", "profile_batch", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    device = runtime.resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    if args.gpu_suite:
        if device.type == "cpu" and args.gpu_suite == "h100":
            print("note: no GPU; the h100 suite takes hours on a CPU (--gpu-suite cpu-check times its parts with a "
                  "few iterations, --gpu-suite tiny runs them in seconds)", file=sys.stderr)
        if not gpu_suite(args.gpu_suite, device, precision, args.out, args.peak_tflops, args.checkpoint):
            sys.exit(1)
        return
    arch = args.arch or ("tiny" if args.quick else "vit-b/16")
    pick = lambda value, quick, full: value if value is not None else (quick if args.quick else full)
    eval_batch, eval_steps = pick(args.eval_batch, 16, 256), pick(args.eval_steps, 3, 10)
    repeats, eps = pick(args.repeats, 1, 3), attacks.parse_eps(args.eps)
    memory_label = "peak MiB" if device.type == "cuda" else "saved MiB"
    if device.type == "cpu" and not args.quick and ((args.eval_batch is None and set(args.bench) & {"eval", "train"})
                                                    or (args.batch is None and "methods" in args.bench)):
        print("note: no GPU; ViT-B/16 at the GPU's batch sizes takes hours on a CPU (see --quick, or the CPU "
              "command in the docstring)", file=sys.stderr)
    print(f"`python {' '.join(sys.argv)}`: {machine(device)}; {precision}"
          + ("" if args.bench == ["e2e"] else f"; {arch} CLIP"
             + (", nap preset" if set(args.bench) - {"attack", "methods", "e2e"} else ""))
          + (f", ours compiled ({args.compile})" if args.compile else ""))

    if "attack" in args.bench:
        if args.quick:
            bench_attack_step(batch=16, size=16, steps=10, repeats=1, device=device)
        else:
            bench_attack_step(device=device)
    backbone = random_clip(arch, device, precision) if set(args.bench) - {"attack", "e2e"} else None
    eval_rows = None
    if "eval" in args.bench:
        eval_rows = bench_eval(backbone, args.classes, eval_batch, eval_steps, eps, device, precision, repeats,
                               args.compile)
        report_eval(eval_rows, args.eps, memory_label)
    if "train" in args.bench:
        report_train(bench_train(backbone, args.classes, args.train_batch, args.train_steps, eps, device, precision,
                                 repeats), memory_label)
    if "text" in args.bench:
        report_text(bench_text(backbone, args.classes, device, precision, repeats))
    if "flops" in args.bench:
        model = prompted(backbone, max(args.classes))
        forward, backward = attack_step_counted(model, 2, device)
        report_flops(model, dict(batch=2, forward=forward, backward=backward),
                     max(eval_rows, key=lambda r: r["classes"]) if eval_rows else None,
                     args.peak_tflops or default_peak(device))
    if "profile" in args.bench:
        for n in args.classes:
            table, wall, _ = bench_profile(backbone, n, args.profile_batch, device, precision)
            report_profile(table, wall, f"Profile of one attack step of ours ({arch}, {n} classes, batch "
                                        f"{args.profile_batch}, {precision}; self times, "
                                        f"{'GPU kernels' if device.type == 'cuda' else 'CPU'}).")
    if "methods" in args.bench:
        report_methods(bench_methods(backbone, device, precision, args.batch, repeats), precision, memory_label)
    if "e2e" in args.bench:  # last: its summary is the last line
        ours, peers, test, name = load_trained(args.checkpoint, args.dataset, device, precision)
        alpha = attacks.parse_eps(args.alpha)
        indices = eval_subset(len(test), args.n_samples, args.seed)
        result = bench_e2e(ours, peers, test, indices, args.batch_size, eps, alpha, args.steps, args.seed, device,
                           precision, early_stop=not args.no_early_stop)
        report_e2e(result, f"PGD-{args.steps} evaluation of {args.checkpoint} on {name} ({len(indices)} test images, "
                           f"seed {args.seed}), eps {args.eps}, step {args.alpha}, batch {args.batch_size}, random "
                           "start; batches in turns. ours: evaluate.py's path (text features once, attacks.pgd"
                           + (" without early stopping" if args.no_early_stop else " with early stopping")
                           + "); peers: model.forward (text encoder in every forward), every point every step, the "
                           "last iterate scored (torchattacks' PGD), the same random start.")


if __name__ == "__main__":
    runtime.run_cli(main)
