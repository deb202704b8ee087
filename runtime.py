"""What train.py and evaluate.py share: the backbone by arch, device and precision, torchrun's
process group, seeds, one-line errors, and results as JSON plus a markdown table.

Plain `python train.py` runs as a world of one; under `torchrun` the environment variables
RANK / WORLD_SIZE / LOCAL_RANK select the process's share of the work.
"""
import argparse
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

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, KeyError)


def fail(message: str, code: int = 2):
    """Prints one clear line on stderr and exits (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where the help text already says it or there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line ('error: ... (see --help)') rather than usage + error; --help shows defaults."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=DefaultsFormatter, **kwargs)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def eps_arg(text: str) -> float:
    """argparse type for --eps/--alpha: attacks.parse_eps with its message kept."""
    import attacks
    try:
        return attacks.parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_cli(main):
    """Runs main(), turning the errors a user can cause into one line and exit status 2."""
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted; finished work is kept, run the same command again to resume", 130)
    except USER_ERRORS as e:
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


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
    """Joins torchrun's process group when launched by torchrun (nccl on CUDA, gloo on CPU); else a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return world


def close_world(world: World):
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str, world: World = World()) -> torch.device:
    """'auto' -> cuda (this rank's GPU) if available, else cpu; anything else as given, checked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------- precision and backbone

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """An autocast context for bf16/fp16, a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


# Defaults of train.py's (and evaluate.py's --eps) flags that depend on the backbone.
# "paper": the baselines' protocol [B]: 16 shots, SGD 0.0035, 100 epochs, CE on PGD images, eps 1/255.
# "toy": the offline toy world at eps 4/255. There, CE on PGD images drives every method to uniform
# logits (the loss sits at ln(classes)), so the toy trains with NAP's curriculum loss [D] and AdamW
# on all 100 training images per class (README, "Offline replication at toy scale").
PROTOCOLS = {"paper": dict(shots=16, epochs=100, optimizer="sgd", lr=0.0035, loss="adv", eps=1 / 255),
             "toy": dict(shots=100, epochs=30, optimizer="adamw", lr=1e-3, loss="curriculum", eps=4 / 255)}


def protocol(arch: str) -> dict:
    """The default training settings for a backbone: PROTOCOLS['toy'] for the toy CLIP, else the paper's."""
    return PROTOCOLS["toy" if arch == "toy" else "paper"]


def default_arch(dataset: str) -> str:
    """The toy CLIP for the synthetic tasks, ViT-B/16 (the paper's backbone) for everything else."""
    return "toy" if dataset.startswith("synthetic") else "ViT-B/16"


def load_backbone(arch: str, device: torch.device, precision: str = "fp32"):
    """'toy', an OpenAI model name or a weights file -> frozen CLIP on device, weights in the run's precision."""
    if arch == "toy":
        import toyclip
        model, _ = toyclip.load(device="cpu")
    else:
        model, _ = clip.load(arch, device="cpu", dtype=torch.float32)
    if precision != "fp32":
        clip.model.convert_weights(model, DTYPES[precision])
    return model.to(device).requires_grad_(False).eval()


# ---------------------------------------------------------------------- seeds

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- results

def markdown_table(results: dict, columns=("clean", "robust")) -> str:
    """{dataset: {clean, robust, ...}} -> a markdown table with an 'average' row."""
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    if len(results) > 1:
        means = [np.mean([r[c] for r in results.values() if r.get(c) is not None] or [np.nan]) for c in columns]
        lines.append("| **average** | " + " | ".join(_cell(m) for m in means) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.2f}"


def write_json(obj, path: str):
    """Writes JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON; remove it to start afresh") from None
