"""Profile of one attack step of ours by part: attention, MLPs, refiners, norms, the patch embedding, prompt
handling, casts and the rest. Each labelled part runs inside a torch.profiler.record_function range; a backward op
is charged to the part of the forward op autograd recorded it for; self times, so the rows add up to the step."""
import collections
import time

import torch
import torch.nn.functional as F

from bench_common import our_logits, prompted, random_images, sync

# Op names by what they do: casts and copies, prompt handling (token splicing), matrix products
CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::type_as"}
PROMPT_OPS = {"aten::cat", "aten::expand", "aten::slice", "aten::narrow", "aten::unsqueeze", "aten::select",
              "aten::split", "aten::unbind", "aten::stack"}
MATMULS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}


# ---------------------------------------------------------------------- labelled parts

def labelled_parts(model):
    """[(module or (object, method name), label)]: the parts of a prompted ViT CLIP's image path the profile
    tells apart; a method is wrapped by name on its object (nap.py's patch embedding and prompt projection)."""
    visual = model.clip.visual
    parts = [((model, "embed_patches"), "patch embedding"), (visual.ln_pre, "layer norms")]
    for block in visual.transformer.resblocks:  # innermost label wins: the block's own label keeps its residual adds
        parts += [(block, "residual adds"), (block.attn, "attention"), (block.mlp, "MLP"), (block.ln_1, "layer norms"),
                  (block.ln_2, "layer norms")]
    parts += [(m, "refiners") for m in getattr(model, "vision_refiners", [])]
    return parts + [((model, "vision_prompts"), "visual prompts (maple projection)")]


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


# ---------------------------------------------------------------------- events -> parts

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


# ---------------------------------------------------------------------- the bench

def bench_profile(backbone, classes, batch, device, precision, steps=2):
    """torch.profiler over `steps` attack steps (forward + input-gradient backward of cross-entropy, as
    attacks.pgd takes them) of ours (nap preset, text features cached) after one warm-up step.
    -> (times as step_profile gives them, per step; wall ms per step; op counts of all steps, by label)."""
    model = prompted(backbone, classes)
    fn = our_logits(model, device, precision)
    x, y = random_images(model, batch, device), torch.arange(batch, device=device) % classes

    def step():
        x_in = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(fn(x_in), y, reduction="none").sum(), x_in)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with Labels(labelled_parts(model)):
        step()
        sync(device)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            wall = (time.perf_counter() - start) / steps
    table, counts = step_profile(prof.events(), device.type == "cuda")
    return {label: [v / steps for v in row] for label, row in table.items()}, 1e3 * wall, counts


def report_profile(table, wall_ms, title):
    """The profile table, parts by total self time, under `title`."""
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
