"""What every command line does before torch loads: one-line errors, the parser, and the checks of paths.

The CLIs (train.py, evaluate.py, replicate.py, protocols.py, toyclip.py, figures.py, bench.py) parse
and check their flags with this module alone (it imports no torch), so that a typo, a bad radius, a
missing dataset folder or an unwritable --out is refused in one line with exit status 2 before torch
is imported, which takes seconds. runtime.py, which the code after that uses, re-exports these names.
"""
import argparse
import errno
import importlib
import math
import os
import sys
import traceback


class RunError(Exception):
    """A condition of the run the user can act on (a NaN loss, a failed sub-command): one line, no traceback."""


# What a user can cause: bad values, missing or unwritable files, a full disk. RuntimeError, KeyError,
# TypeError and the rest are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError, RunError)

PRECISIONS = ("fp32", "bf16", "fp16")  # runtime.DTYPES' names


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


class Later:
    """argparse choices kept in a module that loads torch, e.g. Later("nap", "REFINE"): read when argparse first
    needs them (a flag that names one, or --help), so that every other flag is checked before torch loads. Give the
    flag a metavar (argparse lists the choices of a flag without one as soon as it is added) and "%(choices)s" in
    its help."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def values(self) -> list:
        return list(getattr(importlib.import_module(self.module), self.name))

    def __iter__(self):
        return iter(self.values())

    def __contains__(self, value):
        return value in self.values()

    def __len__(self):
        return len(self.values())


def parse_eps(s):
    """Parse a radius in pixel units: "4/255", "0.0039" or 0.0039 -> float in [0, 1].

    A value above 1 is refused (it would cover the whole pixel range), "8" with a hint to 8/255."""
    text = str(s).strip()
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"eps {s!r} is not a number: give a fraction such as '4/255' "
                         "or a float such as 0.0157")
    if value < 0:
        raise ValueError(f"eps {s!r} is negative; give a radius such as '4/255'")
    if value > 1:
        hint = f"did you mean {text}/255?" if not den else "give a radius such as '4/255'"
        raise ValueError(f"eps {s!r} is larger than the whole [0,1] pixel range; {hint}")
    return value


def eps_arg(text: str) -> float:
    """argparse type for --eps/--alpha: parse_eps with its message kept."""
    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_cli(main, interrupted: str = "interrupted; finished work is kept: run the same command again to resume"):
    """Runs main(), turning the errors a user can cause into one line and exit status 2 (bugs keep their traceback)."""
    try:
        main()
    except KeyboardInterrupt:
        fail(interrupted, 130)
    except USER_ERRORS as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            fail(f"no space left on the device{' writing ' + e.filename if e.filename else ''}; free some space "
                 f"and run the same command again (finished work is kept)")
        fail(one_line(e))
    except RuntimeError as e:
        torch = sys.modules.get("torch")  # only a run that loaded torch can run out of its memory
        if torch is None or not isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
            raise  # (older torch releases name it only torch.cuda.OutOfMemoryError)
        traceback.print_exc()
        fail("out of memory: try a smaller --batch-size (or --precision fp16 on a GPU)", 1)


def one_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


def device_arg(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N (whether this machine has that GPU is runtime.py's check)."""
    kind, _, index = text.partition(":")
    if text == "auto" or (kind in ("cpu", "cuda") and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")


def check_writable(path: str, folder: bool, flag: str = "--out") -> str:
    """Refuses an output path that cannot be written before any work starts; returns it.

    folder=True: path is (or will be) a folder; folder=False: path is a file, its folder must be writable.
    """
    if folder and os.path.isfile(path):
        raise ValueError(f"{flag} {path} is a file; give a folder (it will be created)")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'results.json')}")
    target = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(target, exist_ok=True)
        probe = os.path.join(target, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror or e}); choose another {flag}") from None
    return path


def default_arch(dataset: str) -> str:
    """The toy CLIP for the synthetic tasks, ViT-B/16 (the paper's backbone) for everything else."""
    return "toy" if dataset.startswith("synthetic") else "ViT-B/16"


def check_inputs(dataset: str = None, data_root: str = None, arch: str = None, vision_weights: str = None):
    """Refuses, before torch loads, inputs that are plainly missing: a dataset given as a path, --data-root, a named
    dataset's folder under it (catalog.py; data.py checks the files inside), an --arch given as a file name (tiny.pt),
    --vision-weights. An OpenAI model name is checked by clip.load."""
    if dataset and os.sep in dataset and not os.path.isdir(dataset):
        raise FileNotFoundError(f"no folder at {dataset!r}; expected a folder of class sub-folders "
                                f"(<class>/<image>), optionally under train/ and test/ (or val/)")
    named = dataset and not dataset.startswith("synthetic") and not os.path.isdir(dataset)
    if named and data_root and not os.path.isdir(os.path.expanduser(data_root)):
        raise FileNotFoundError(f"--data-root {data_root}: no such folder; give the folder that holds the datasets "
                                f"(DATASETS.md)")
    if named and (not data_root or os.path.isdir(os.path.expanduser(data_root))):
        import catalog
        key, root = catalog.dataset_key(dataset), os.path.expanduser(data_root or catalog.default_root())
        if key in catalog.DATASETS and not os.path.isdir(os.path.join(root, catalog.DATASETS[key].folder)):
            raise FileNotFoundError(f"dataset not found. {catalog.layout(key, root)}")
    if arch and os.path.splitext(arch)[1] and not os.path.isfile(arch):  # a file name (OpenAI's names have no suffix)
        raise FileNotFoundError(f"--arch {arch} not found: no such file; give toy, an OpenAI model name "
                                f"(ViT-B/16, ...) or a weights file")
    if vision_weights and not os.path.isfile(vision_weights):
        raise FileNotFoundError(f"--vision-weights {vision_weights} not found: no such file")
