"""What every bench shares: timing in turns, the memory figure, a random CLIP of a given size, ours' and the peers'
logits functions, the peers' PGD, the machine line and the table formatting."""
import datetime
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

import nap
import runtime
from clip.model import CLIP

# CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
#      vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHS = {"vit-b/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
         "tiny": (64, 64, 4, 128, 16, 77, 49408, 64, 1, 2)}

# Dense bf16 peak TFLOP/s of the GPUs this may run on, by a part of the device name (first match wins)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


# ---------------------------------------------------------------------- timing

def sync(device):
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns, repeats, device="cpu"):
    """[(best wall time of `repeats` calls of fn(), its last result) for fn in fns], the calls
    taken in turns so that a change in machine load hits every fn alike; on CUDA each call is
    bracketed by synchronize, so the time is the device's."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            results[k] = fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - start)
    return list(zip(best, results))


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


def random_images(model, batch, device, seed=0):
    """`batch` seeded uniform images [batch, 3, R, R] in [0, 1] at the model's resolution R, on device."""
    res = model.clip.visual.input_resolution
    return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(seed)).to(device)


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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    saved = _SavedBytes([*model.parameters(), *model.buffers()])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        fn()
    return saved.peak


def memory_label(device):
    """The memory column's name: CUDA's peak allocation, or the CPU's saved-tensor proxy."""
    return "peak MiB" if device.type == "cuda" else "saved MiB"


# ---------------------------------------------------------------------- the machine and the tables

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


def mib(nbytes):
    """Bytes as whole MiB with thousands separators."""
    return f"{nbytes / 2 ** 20:,.0f}"


def duration(seconds):
    """Seconds as hours or minutes, one decimal."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
