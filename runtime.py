"""What train.py and evaluate.py share: the backbone by arch, device and precision, torchrun's
process group, seeds, one-line errors, one run at a time per output file (exclusive), and results
as JSON plus a markdown table (accuracies with their intervals).

Plain `python train.py` runs as a world of one; under `torchrun` the environment variables
RANK / WORLD_SIZE / LOCAL_RANK select the process's share of the work.
"""
import contextlib
import json
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import clip
# The command lines' plumbing, which loads no torch (cmdline.py), under the names the code after parsing uses
from cmdline import (USER_ERRORS, DefaultsFormatter, Parser, RunError, check_writable, default_arch,  # noqa: F401
                     eps_arg, fail, one_line, run_cli)


LOCK_TAG = "lock of a run writing"  # the first words of every lock file this module writes


@contextlib.contextmanager
def exclusive(path: str, flag: str = "--out"):
    """Holds `<path>.lock` for the block, so that one run at a time writes path; a second is refused in one line.

    fcntl.flock: the kernel releases the lock when its process ends however it ends, so a lock
    file left by a killed run never blocks. The file holds the holder's pid and is removed on exit."""
    import fcntl
    lock = f"{path}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            if isinstance(e, BlockingIOError):
                who = f"pid {holder.rpartition('pid ')[2]}" if "pid " in holder else lock
                raise RunError(f"{flag} {path} is being written by another run ({who}); wait for it to finish, "
                               f"or choose another {flag}") from None
            raise RunError(f"{lock} cannot be locked ({e.strerror}): this file system offers no file locks; "
                           f"choose an {flag} on a local disk") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
    ours = False
    try:
        found = os.read(fd, 200).decode(errors="replace")
        if found and not found.startswith(LOCK_TAG):
            raise ValueError(f"{lock} exists and is not a lock file of this project; move it away, or choose "
                             f"another {flag}")
        ours = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{LOCK_TAG} {path}: pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        if ours:  # removed while still locked: a run waiting to lock this file retries on the path
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
        os.close(fd)


_HASHES = {}  # (path, size, mtime) -> SHA256: a file is hashed once per process however often it is named


def sha256_file(path: str) -> str:
    """The SHA256 of a file's contents (hex)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = clip.sha256_of(path)
    return _HASHES[key]


# ---------------------------------------------------------------------- distributed

@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> World:
    """Joins torchrun's process group when launched by torchrun (nccl on this rank's GPU, gloo on the CPU); else a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        rank_device = resolve_device(device, world)  # 'auto' resolves per rank
        if rank_device.type == "cuda":
            dist.init_process_group("nccl", device_id=rank_device)
        else:
            dist.init_process_group("gloo")
    return world


def close_world(world: World):
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str, world: World = World()) -> torch.device:
    """'auto' -> cuda (this rank's GPU) if available, else cpu; anything else as given, checked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------- precision and backbone

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}




def resolve_precision(precision: str, device: torch.device, eps: float = None) -> str:
    """'auto' -> fp16 on a GPU (the peers' precision), fp32 on the CPU; a one-line warning for bf16 below 4/255."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and eps is not None and eps < 4 / 255 - 1e-9:
        print(f"warning: bf16 keeps 8 significant bits, too few for a perturbation of {eps * 255:.3g}/255 inside the "
              f"blocks; --precision fp16 (or fp32) keeps it", file=sys.stderr)
    return precision


def autocast(device: torch.device, precision: str):
    """An autocast context for bf16/fp16, a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def backbone_file(arch: str):
    """The weights file behind an arch: the toy's cached file, a path itself; None for OpenAI's names
    (clip.load checks their files against the SHA256 in the download URL)."""
    if arch == "toy":
        import toyclip
        return os.path.join(clip.cache_dir(), toyclip.ToyConfig().name())
    return None if arch in clip.available_models() else arch


def load_backbone(arch: str, device: torch.device, precision: str = "fp32", vision_weights: str = None):
    """'toy', an OpenAI model name or a weights file (+ robust image encoder weights) -> frozen CLIP on device.

    Under fp16/bf16 the weights are cast as OpenAI's release casts them, except the patch embedding,
    which stays float32 (PromptedCLIP computes the normalisation and the patch embedding in float32).
    """
    if arch == "toy":
        import toyclip
        model, _ = toyclip.load(device="cpu")
    else:
        model, _ = clip.load(arch, device="cpu", dtype=torch.float32)
    if vision_weights:
        clip.load_vision_weights(model, vision_weights)
    if precision != "fp32":
        conv1 = model.visual.conv1.weight.detach().clone()
        clip.model.convert_weights(model, DTYPES[precision])
        if hasattr(model.visual, "class_embedding"):  # ViT: the patch embedding stays float32
            model.visual.conv1.weight.data = conv1
    return model.to(device).requires_grad_(False).eval()


def backbone_record(arch: str, vision_weights: str = None) -> dict:
    """What identifies a backbone's weights: {arch, arch_sha256, vision_weights, vision_sha256} (hashes of the files)."""
    path = backbone_file(arch)
    return {"arch": arch, "arch_sha256": sha256_file(path) if path and os.path.isfile(path) else None,
            "vision_weights": os.path.abspath(vision_weights) if vision_weights else None,
            "vision_sha256": sha256_file(vision_weights) if vision_weights else None}


def check_backbone(saved: dict, arch: str, vision_weights: str = None, surrogate: str = None):
    """Refuses to rebuild a checkpoint's backbone from files that differ from those it was trained on.
    surrogate: the --surrogate checkpoint being checked, whose backbone files have no flag of their own."""
    for key, path, flag in (("arch", backbone_file(arch), "--arch"), ("vision", vision_weights, "--vision-weights")):
        want = saved.get(f"{key}_sha256")
        if want is None:
            continue
        fix = f"give the same weights with {flag} FILE" if surrogate is None else \
            "put those weights back where the checkpoint names them (a surrogate is rebuilt on its own backbone)"
        who = "the checkpoint" if surrogate is None else f"--surrogate {surrogate}"
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"{who} was trained with {saved.get(key if key == 'arch' else 'vision_weights')} "
                                    f"(SHA256 {want[:12]}...), which is gone; {fix}")
        got = sha256_file(path)
        if got != want:
            raise ValueError(f"{path if surrogate else flag + ' ' + path} has SHA256 {got[:12]}..., but {who} was "
                             f"trained with SHA256 {want[:12]}...; {fix}")


# ---------------------------------------------------------------------- seeds

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- results

def markdown_table(results: dict, columns=("clean", "robust")) -> str:
    """{dataset: {clean, robust, ...}} -> a markdown table with an 'average' row.

    A value with an interval beside it (`<column>_ci95`: [low, high]) shows it in brackets,
    '50.00 [43.1, 56.9]'; rows that carry `n_samples` get an `n` column (the images behind them)."""
    counted = any("n_samples" in r for r in results.values())
    lines = ["| dataset | " + ("n | " if counted else "") + " | ".join(columns) + " |",
             "|---|" + "---:|" * (len(columns) + counted)]
    for name, r in results.items():
        n = [str(r.get("n_samples", "-"))] if counted else []
        lines.append(f"| {name} | " + " | ".join(n + [_cell(r.get(c), r.get(f"{c}_ci95")) for c in columns]) + " |")
    if len(results) > 1:
        means = [np.mean([r[c] for r in results.values() if r.get(c) is not None] or [np.nan]) for c in columns]
        lines.append("| **average** | " + ("- | " if counted else "") + " | ".join(_cell(m) for m in means) + " |")
    return "\n".join(lines)


def _cell(value, interval=None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.2f}" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")


def write_json(obj, path: str):
    """Writes JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt leaves the previous file, and no temporary one
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON; remove it to start afresh") from None
