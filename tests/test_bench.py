"""bench.py: the peers' re-creation computes what ours computes; FLOP counts; memory bookkeeping; sane rows;
e2e on a checkpoint (ours = evaluate.py, never more robust, = the peers without early stopping); the GPU suite
and the profile at tiny size; one training step per method as train.py takes it; the CLI: help for every flag, one-line
errors, and the flags checked before torch is imported."""
import argparse
import dataclasses
import re
import subprocess
import sys

import pytest
import torch

import attacks
import bench
import bench_common
import bench_e2e
import bench_flops
import bench_gpu
import bench_methods
import bench_profile
import bench_speed
import evaluate
import nap
import runtime
import synthetic
import train
from clip.model import CLIP
from conftest import ROOT, one_line_error

MICRO = (32, 32, 2, 64, 16, 77, 49408, 32, 1, 2)  # 2 layers per tower, 4 patches
CPU = torch.device("cpu")
EPS = 4 / 255


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return CLIP(*MICRO).requires_grad_(False).eval()


def batch(model, n=6, seed=0):
    x = bench_common.random_images(model, n, CPU, seed)
    return x, torch.arange(n) % len(model.classnames)


def test_peers_compute_our_logits(backbone):
    model = bench_common.prompted(backbone, 7)
    x, _ = batch(model)
    with torch.no_grad():
        assert torch.equal(bench_common.peers_logits(model, CPU, "fp32")(x), bench_common.our_logits(model, CPU, "fp32")(x))


def test_peers_train_loss_and_gradients_are_ours(backbone):
    """Same PGD start, same adversarial images, same loss, same gradients on prompts and refiners."""
    model = bench_common.prompted(backbone, 5).train()
    x, y = batch(model)
    start = (x + EPS * (2 * bench_common.random_images(model, len(x), CPU, seed=1) - 1)).clamp(0, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for loss_fn in (bench_speed.peers_train_loss, bench_speed.our_train_loss):
        loss = loss_fn(model, x, y, start, EPS, EPS, 2)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_p, grads_p), (loss_o, grads_o) = results
    assert torch.allclose(loss_p, loss_o, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_p, grads_o))
    assert any(g.abs().sum() > 0 for g in grads_o)


@pytest.mark.parametrize("n_classes", [3, 40])
def test_analytic_flops_match_the_counter(backbone, n_classes):
    model = bench_common.prompted(backbone, n_classes)
    assert bench_flops.attack_step_counted(model, 3, CPU) == bench_flops.image_flops(model, batch=3)
    with torch.no_grad():
        assert bench_flops.counted_flops(model.text_features) == bench_flops.text_flops(model)


def test_vit_b16_flops_by_hand():
    """Zero-shot ViT-B/16, 1000 classes: 197 tokens, 12 blocks of width 768, no prompts."""
    torch.manual_seed(0)
    model = nap.PromptedCLIP(CLIP(*bench_common.ARCHS["vit-b/16"]), [str(i) for i in range(1000)], nap.PRESETS["zeroshot"])
    block = 24 * 197 * 768 ** 2 + 4 * 197 ** 2 * 768
    linear = 2 * (196 * 768 * 768 + 12 * 197 * 12 * 768 ** 2 + 768 * 512 + 512 * 1000)
    forward, backward = bench_flops.image_flops(model)
    assert forward == 12 * block + 2 * (196 * 768 * 768 + 768 * 512 + 512 * 1000)
    assert backward == linear + 2 * (12 * 4 * 197 ** 2 * 768)
    assert 35e9 < forward < 36e9  # 17.6 GMAC
    assert bench_flops.text_flops(model) == 2 * 1000 * (12 * (77 * 12 * 512 ** 2 + 2 * 77 ** 2 * 512) + 512 * 512)


def test_saved_bytes_count_storages_once_and_skip_weights():
    lin = torch.nn.Linear(100, 100)
    x = torch.rand(10, 100, requires_grad=True)
    assert bench_common.peak_memory(lambda: (x * x).sum(), CPU, lin) == x.nbytes  # x saved twice, one storage
    assert bench_common.peak_memory(lambda: lin(x).sum(), CPU, lin) == x.nbytes  # the weight is not counted

    def three_graphs():  # each is freed before the next is built, run or not: the peak is one of them
        torch.autograd.grad((x * 2).exp().sum(), x)
        (x * 3).exp().sum()  # exp saves its own output: holding it must not keep the graph alive
        (x * 4).exp().sum()
    assert bench_common.peak_memory(three_graphs, CPU, lin) == x.nbytes


def test_protocol_projection_formula():
    images = sum(n for n, _ in bench_flops.PROTOCOL.values())
    assert images == 131_233
    assert bench_flops.protocol_seconds(1.0, 0.0, step_flops=2, forward_flops=1) == pytest.approx(images * 102)
    assert bench_flops.protocol_seconds(2.0, 1.0, 2, 1, work=0.5) == pytest.approx(images * 52 / 2 + 2089)


def test_bench_rows_are_sane(backbone):
    classes = (3, 30)
    rows = bench_speed.bench_eval(backbone, classes, batch=4, steps=2, eps=EPS, device=CPU, precision="fp32", repeats=1)
    assert [r["classes"] for r in rows] == list(classes)
    for r in rows:
        assert min(r["text_s"], r["peers_s"], r["full_s"], r["ours_s"]) > 0
        assert 0 <= r["work"] <= 1 and 0 <= r["robust"] <= 100
        assert r["peers_mem"] > r["ours_mem"] > 0  # the peers also keep the text encoder's activations
    train = bench_speed.bench_train(backbone, classes, batch=4, steps=1, eps=EPS, device=CPU, precision="fp32", repeats=1)
    assert all(r["peers_s"] > 0 and r["ours_s"] > 0 and r["peers_mem"] >= r["ours_mem"] > 0 for r in train)
    text = bench_speed.bench_text(backbone, classes, CPU, "fp32", repeats=1)
    assert text[1]["flops"] == 10 * text[0]["flops"] and all(r["seconds"] > 0 for r in text)


# ---------------------------------------------------------------------- e2e on a trained-checkpoint layout

TINY32 = (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2)  # 32 px, 16 patches, 2 layers per tower
E2E_LINE = re.compile(r"^e2e: ours (\d+\.\d) s, peers (\d+\.\d) s, speed-up (\d+\.\d\d)x, "
                      r"robust ours (\d+\.\d)%, peers (\d+\.\d)%$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A NAP checkpoint (random prompts, depth 2) on a tiny CLIP saved to a file, recording synthetic as its dataset."""
    folder = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(1)  # a random CLIP whose predictions vary with the image (seed 0 predicts one class)
    weights = str(folder / "tiny.pt")
    torch.save(CLIP(*TINY32).state_dict(), weights)
    model = nap.PromptedCLIP(runtime.load_backbone(weights, CPU), synthetic.TASKS["synthetic"], nap.make_config("nap", depth=2))
    path = str(folder / "checkpoint.pt")
    nap.save_checkpoint(model, path, arch=weights, args={"dataset": "synthetic"})
    return path


def e2e(checkpoint, early_stop, eps=8 / 255, steps=3):
    ours, peers, test, name = bench_e2e.load_trained(checkpoint, None, CPU, "fp32")
    indices = bench_e2e.eval_subset(len(test), 8, seed=0)
    return bench_e2e.bench_e2e(ours, peers, test, indices, 4, eps, 2 / 255, steps, 0, CPU, "fp32", early_stop=early_stop), \
        (ours, test, indices)


def test_e2e_cli_prints_the_summary_last(checkpoint, capsys):
    bench.main(["--bench", "e2e", "--checkpoint", checkpoint, "--n-samples", "8", "--steps", "2", "--batch-size", "4",
                "--eps", "8/255", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    m = E2E_LINE.match(lines[-1])
    assert m, lines[-1]
    ours_s, peers_s, speedup, robust_ours, robust_peers = map(float, m.groups())
    assert robust_ours <= robust_peers and speedup > 0
    assert any(line.startswith("| ours |") for line in lines) and any(line.startswith("| peers |") for line in lines)


def test_e2e_ours_is_evaluate_py_and_never_more_robust(checkpoint):
    (r, (ours, test, indices)) = e2e(checkpoint, early_stop=True)
    o, p = r["ours"], r["peers"]
    assert r["n"] == 8 and r["batches"] == 2
    assert p["grad_images"] == 8 * 3 and o["grad_images"] <= p["grad_images"]
    assert o["robust"].sum() <= p["robust"].sum() and torch.equal(o["clean"], p["clean"])
    assert not (o["robust"] & ~o["clean"]).any()  # a misclassified clean image is never robust for ours
    # ours scores each batch exactly as evaluate.py does (same subset, same seeds)
    assert indices == sorted(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:8].tolist())
    fn = bench_common.our_logits(ours, CPU, "fp32")
    args = argparse.Namespace(attack="pgd", eps=8 / 255, alpha=2 / 255, steps=3, pgd_score="any")
    for b in range(2):
        idx = indices[4 * b:4 * b + 4]
        x, y = torch.stack([test[i][0] for i in idx]), torch.tensor([test[i][1] for i in idx])
        counts = evaluate.evaluate_batch(fn, x, y, args, seed=b)
        assert counts["clean"] == int(o["clean"][4 * b:4 * b + 4].sum())
        assert counts["robust"] == int(o["robust"][4 * b:4 * b + 4].sum())


def test_e2e_without_early_stop_is_the_peers_attack(checkpoint):
    """Same start, same steps on every point, the last iterate: ours without early stopping makes the peers'
    adversarial images bit for bit (batch of 4: mean and summed cross-entropy have gradients of the same sign
    exactly) and predicts what the peers predict on every image."""
    ours, peers, test, _ = bench_e2e.load_trained(checkpoint, None, CPU, "fp32")
    x = torch.stack([test[i][0] for i in (0, 60, 120, 180)])
    with torch.no_grad():
        y = ours(x).argmax(1)  # every point starts correctly classified
    for seed in (0, 1):
        mine = attacks.pgd(bench_common.our_logits(ours, CPU, "fp32"), x, y, 4 / 255, 1 / 255, 3, early_stop=False, seed=seed)
        theirs = bench_common.naive_pgd(bench_common.peers_logits(peers, CPU, "fp32"), x, y, 4 / 255, 1 / 255, 3,
                                 bench_e2e.peers_start(x, 4 / 255, seed))
        assert torch.equal(mine, theirs)
        assert (mine - x).abs().max() > 3.5 / 255  # the steps went somewhere
    (r, _) = e2e(checkpoint, early_stop=False)
    o, p = r["ours"], r["peers"]
    assert torch.equal(o["adv_pred"], p["adv_pred"]) and torch.equal(o["robust"], p["robust"])
    assert o["grad_images"] == p["grad_images"] == 8 * 3 and (p["adv_pred"] != p["clean_pred"]).any()


def test_e2e_fails_loudly_when_ours_is_more_robust(checkpoint, monkeypatch):
    """The invariant is checked: a peers' path that breaks more points than ours can only be a bug."""
    real = bench_e2e.peers_batch
    monkeypatch.setattr(bench_e2e, "peers_batch", lambda fn, x, y, *a: (real(fn, x, y, *a)[0], (y + 1) % 6))
    with pytest.raises(AssertionError, match="bug"):
        e2e(checkpoint, early_stop=True, eps=0.0, steps=1)


# ---------------------------------------------------------------------- the GPU suite and the profile, tiny

def test_gpu_suite_runs_every_part_tiny(tmp_path):
    out = tmp_path / "suite.md"
    assert bench_gpu.gpu_suite("tiny", CPU, "fp32", str(out))
    text = out.read_text()
    for heading in ("One text-encoder forward", "Evaluation, PGD-2", "Attack step alone", "FLOPs of one attack step",
                    "Training step", "Profile of one attack step", "Training step per method", "Attack precision"):
        assert heading in text, heading
    assert "torch.compile (eager)" in text and "failed" not in text and "skipped" not in text
    assert "| counted / analytic at batch 2 | 1.0000 | 1.0000 | 1.0000 |" in text
    # the same model in fp16 (on the CPU too) and fp32: attacks.pgd breaks the same points (before its fix, fp16's
    # softmax gradient underflowed: 66.7% against 33.3% here)
    m = re.search(r"^precision: robust fp16 (\d+\.\d)%, fp32 (\d+\.\d)%, 0\.0 points apart: PASS \(within 0\.5\)$",
                  text, re.M)
    assert m and 0 < float(m[1]) == float(m[2]) < 100, m


def test_precision_check_fails_loudly_beyond_half_a_point(backbone, monkeypatch):
    s = dataclasses.replace(bench_gpu.SUITES["tiny"], precision_images=2, precision_steps=1)
    monkeypatch.setattr(bench_gpu, "bench_precision", lambda fns, *a: {"fp16": (100.0, 40.0), "fp32": (100.0, 39.0)})
    with pytest.raises(AssertionError, match="robust accuracy in fp16 is 1.0 points from fp32's"):
        bench_gpu.precision_check(s, backbone, CPU, "fp32")
    monkeypatch.setattr(bench_gpu, "bench_precision", lambda fns, *a: {"bf16": (100.0, 40.0), "fp32": (100.0, 39.5)})
    assert bench_gpu.precision_check(s, backbone, CPU, "bf16")["bf16"] == (100.0, 40.0)  # the run's 16 bits; 0.5: a pass


def test_suite_budget_fits_eight_minutes():
    """The H100 plan: every part's work at the assumed rate (plus compilation) within the budget, < 8 min in all."""
    s = bench_gpu.SUITES["h100"]
    work = bench_gpu.suite_work(s, 87.34, 42.95, 7.2178)
    estimates = bench_gpu.suite_estimates(s, work)
    assert sum(estimates.values()) < s.budget_s <= 8 * 60
    assert work["eval"][0] == (3 * 3 + 2) * 256 * 10 * 3  # peers, ours-full, ours per repeat, + 2 memory steps
    assert estimates["compile"] >= s.compile_s and estimates["eval"] > 30
    # methods, 4 steps of batch 32: image-steps advmaple 16 x 2 + 32, nap 32 x (5 + 2), tecoa 32 x (2 + 1) + 32 and
    # fare 32 x (10 + 1) + 32 (weight gradients); FARE's 3 forward-only passes; text 100 classes x 3 with a backward
    assert work["methods"][:3] == (4 * (64 + 224 + 128 + 384), 4 * 96, 4 * 100 * (3 + 3 + 1 + 1))
    # precision: PGD-100 on 200 images in fp16 and fp32, the fp32 half at a fifth of the rate
    assert work["precision"][:3] == (2 * 200 * 100, 2 * 5 * 200, 0)
    assert estimates["precision"] == pytest.approx(3 * work["precision"][3] / 1e3 / 150)
    assert list(work)[-2:] == ["precision", "compile"]  # compilation last


def test_profile_accounts_for_every_op(backbone, monkeypatch):
    """The labelled parts cover the step, by op counts (time shares vary on a busy machine): every op of the profile
    lands in one part, once; attention, MLPs, refiners, norms and the patch embedding are found, each holding its
    layers' own ops forward and backward (the backward of attention is not 'other'); the head's matmuls and the
    loss are 'other' in both directions, not casts (a no-op .float() shares their autograd sequence number)."""
    seen, real = [], bench_profile.step_profile
    monkeypatch.setattr(bench_profile, "step_profile", lambda events, device_time: seen.append(events) or real(events, device_time))
    table, wall, ops = bench_profile.bench_profile(backbone, 5, 2, CPU, "fp32", steps=1)
    (events,) = seen
    n_ops = sum(e.device_type == torch.autograd.DeviceType.CPU and not e.name.startswith("part:") for e in events)
    assert sum(sum(c.values()) for c in ops.values()) == n_ops and set(table) == set(ops) and wall > 0
    layers = backbone.visual.transformer.layers
    for label in ("attention", "MLP"):  # two linear layers each; frozen weights: the input gradient's matmul alone
        assert ops[label]["forward", "aten::addmm"] == ops[label]["backward", "aten::mm"] == 2 * layers, label
    kernel = lambda phase: sum(k for (p, name), k in ops["attention"].items()
                               if p == phase and name.startswith("aten::_scaled_dot_product"))
    assert kernel("forward") == kernel("backward") == layers
    norms = ops["layer norms"]  # ln_1 and ln_2 of each block, ln_pre
    assert norms["forward", "aten::native_layer_norm"] == norms["backward", "aten::native_layer_norm_backward"] \
        == 2 * layers + 1
    assert ops["refiners"]["forward", "aten::addmm"] > 0 and ops["refiners"]["backward", "aten::mm"] > 0
    assert ops["patch embedding"]["backward", "aten::convolution_backward"] == 1
    other = ops["other (normalisation, logits, loss, elementwise)"]
    assert other["forward", "aten::mm"] == other["backward", "aten::mm"] == 2  # projection head, logits
    assert other["forward", "aten::_log_softmax"] == other["backward", "aten::_log_softmax_backward_data"] == 1
    assert not any(name in bench_profile.MATMULS for _, name in ops["casts and copies (outside the parts)"])
    assert "visual prompts (maple projection)" not in table  # logits_fn() projects the frozen prompts once, not per step


def test_suite_skips_what_would_overrun_its_budget(tmp_path, monkeypatch):
    """At 4 MFLOP/s assumed, the tiny text pass (< 1 GFLOP) fits a 1000 s budget, the evaluation (~8 GFLOP) does not."""
    monkeypatch.setitem(bench_gpu.SUITES, "slow", dataclasses.replace(bench_gpu.SUITES["tiny"], budget_s=1000.0, est_tflops=4e-6))
    out = tmp_path / "suite.md"
    assert bench_gpu.gpu_suite("slow", CPU, "fp32", str(out))
    text = out.read_text()
    assert "**eval: skipped**, budgeted" in text and "**train: skipped**, budgeted" in text
    assert "Evaluation, PGD" not in text and "Training step" not in text
    assert "One text-encoder forward" in text and "| counted / analytic at batch 2 |" in text
    assert re.search(r"\| eval \| \d+ \| skipped \|", text)


# ---------------------------------------------------------------------- one training step per method

def test_methods_take_train_py_steps(backbone):
    """Each method's step is train.py's: its recipe's attack and loss (image passes counted by hooks, against the
    recipe's numbers by hand), the trained tensors nap.count_parameters counts, the recipe's optimiser state; the
    shared backbone comes back unchanged and frozen."""
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rows = bench_methods.bench_methods(backbone, CPU, "fp32", batch=4, repeats=1)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["advmaple", "nap", "tecoa", "fare"]
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters())
    names = [f"class {i}" for i in range(100)]  # caltech101's class count
    for method, r in by.items():
        assert r["error"] is None and r["seconds"] > 0 and r["memory"] > 0
        args = bench_methods.method_args(method)
        model = train.build_model(args, backbone, names)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert r["params"] == r["optimized"] == nap.count_parameters(model)["total"] == sum(p.numel() for p in trained)
        if args.optimizer == "sgd":  # one momentum buffer per tensor
            assert r["state_bytes"] == 4 * r["params"]
        else:  # AdamW: two moments per tensor and a scalar step count
            assert r["state_bytes"] == 8 * r["params"] + 4 * len(trained)
        assert {"grad": r["grad"], "forward": r["forward"]} == r["expected"] == bench_methods.step_passes(args, 4)
    backbone.requires_grad_(False)
    assert by["fare"]["params"] == by["tecoa"]["params"] > by["nap"]["params"] > by["advmaple"]["params"] > 0
    assert by["tecoa"]["params"] == sum(p.numel() for p in backbone.visual.parameters())
    # by hand: PGD-2 on the half loss's adversarial half + one loss pass on the batch (baselines recipe)
    assert by["advmaple"]["grad"] == [2, 2, 4] and by["advmaple"]["forward"] == []
    assert by["nap"]["grad"] == [4] * (5 + 2) and by["nap"]["forward"] == []  # PGD-5, clean + adversarial passes
    assert by["tecoa"]["grad"] == [4] * (2 + 1) and by["tecoa"]["forward"] == []  # PGD-2, CE on x'
    assert by["fare"]["grad"] == [4] * (10 + 1)  # PGD-10, the distance on x'
    assert by["fare"]["forward"] == [4] * 3  # the frozen reference on x, the two logged predictions
    assert [by[m]["text"] for m in by] == [[True], [True], [False], [False]]  # text prompts: a text backward
    assert by["nap"]["state_bytes"] > 2 * by["advmaple"]["state_bytes"]


def test_methods_cli_prints_one_row_per_method(capsys):
    bench.main(["--bench", "methods", "--arch", "tiny", "--device", "cpu", "--batch-size", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0][2:] for row in rows] == ["advmaple", "nap", "tecoa", "fare"]
    assert "failed" not in out and "fare: fare, PGD-10 | adamw" in out and "| 11 (10 + 1) | 11 | 3 | fwd |" in out


def test_methods_bench_reports_a_failed_step_and_restores_the_backbone(backbone, monkeypatch, capsys):
    """A step that fails is one row saying why; the backbone comes back as it was, dtypes included, even where
    building the model changed them."""
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    def oom(*args, **kwargs):
        raise RuntimeError("out of memory\nmore detail")
    build = train.build_model
    monkeypatch.setattr(train.AdversarialStep, "attack", oom)
    built = []

    def build_in_double(args, clip, names):  # as a build_model that kept the trained encoder in another dtype would
        clip.visual.double()
        built.append(clip.visual.proj.dtype)
        return build(args, clip, names)
    monkeypatch.setattr(train, "build_model", build_in_double)
    rows = bench_methods.bench_methods(backbone, CPU, "fp32", batch=2, repeats=1, methods=("nap", "tecoa"))
    assert [r["error"] for r in rows] == ["RuntimeError: out of memory"] * 2 and built == [torch.float64] * 2
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters())
    bench_methods.report_methods(rows, "fp32", "saved MiB")
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tecoa")]
    assert table[0].endswith("failed: RuntimeError: out of memory |" + " |" * 7)
    assert table[0].count("|") == 13  # as many cells as the header


# ---------------------------------------------------------------------- the CLI, checked before torch is imported

# `python bench.py ARGS`, then one more line on stdout saying whether torch was imported by then
NO_TORCH = ("import runpy, sys\nsys.argv = ['bench.py', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_path('bench.py', run_name='__main__')\n"
            "finally:\n    print('torch imported:', 'torch' in sys.modules)\n")


def bench_cli(*args):
    """bench.py run from the project with args -> (CompletedProcess, its stdout without the torch line)."""
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out, _, torch_line = r.stdout.rstrip("\n").rpartition("\n")
    assert torch_line == "torch imported: False", (torch_line, r.stderr)
    return r, out


def test_help_ends_cleanly_and_names_every_flag():
    r, out = bench_cli("--help")
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert out.rstrip().endswith(".") and "python bench.py --quick" in out
    for action in bench.build_parser()._actions:
        assert all(flag in out for flag in action.option_strings)


def test_every_flag_has_help_and_one_batch_size():
    actions = bench.build_parser()._actions
    assert all(a.help and a.help.strip() for a in actions), [a.option_strings for a in actions if not a.help]
    assert [f for a in actions for f in a.option_strings if "batch" in f] == ["--batch-size"]
    assert [f for a in actions for f in a.option_strings if "steps" in f] == ["--steps"]


@pytest.mark.parametrize("args, fragment", [
    (["--eval-batch", "8"], "unrecognized arguments: --eval-batch"),
    (["--batch-size", "0"], "--batch-size"),
    (["--classes", "10", "x"], "--classes"),
    (["--eps", "8"], "--eps"),
    (["--alpha", "1/0"], "--alpha"),
    (["--device", "tpu"], "--device"),
    (["--compile", "fast"], "--compile"),
    (["--bench", "e2e"], "needs --checkpoint"),
    (["--bench", "e2e", "--checkpoint", "missing/checkpoint.pt"], "does not exist"),
    (["--checkpoint", "bench.py"], "is for --bench e2e and --gpu-suite"),
    (["--out", "suite.md"], "is for --gpu-suite"),
    (["--gpu-suite", "tiny", "--out", "tests"], "is a folder"),
    (["--gpu-suite", "tiny", "--out", "missing/suite.md"], "cannot be written"),
])
def test_a_bad_flag_is_one_line_before_torch(args, fragment):
    r, _ = bench_cli(*args)
    one_line_error(r, fragment, "see bench.py --help")


def test_the_cli_names_agree_with_the_modules():
    """bench.py spells out the names its flags accept (the modules that define them import torch)."""
    assert bench.ARCH_NAMES == tuple(bench_common.ARCHS) and bench.SUITE_NAMES == tuple(bench_gpu.SUITES)
    assert sorted(bench.PRECISIONS) == sorted(runtime.DTYPES)
    for text in ("1/255", "0.0039", "0", "1", "8", "-1/255", "x", "1/0", "nan", "inf", "2/255/3"):
        try:
            attacks.parse_eps(text)
            valid = True
        except ValueError:
            valid = False
        try:
            assert bench.radius(text) == text and valid, text
        except argparse.ArgumentTypeError:
            assert not valid, text


def test_each_bench_takes_the_shared_flags_or_its_default():
    args = bench.parse_args(["--quick"])
    assert [bench.default(args, "batch_size", bench.BATCH, b) for b in ("attack", "eval", "train", "e2e")] == \
        [16, 16, 32, 256]
    args = bench.parse_args(["--batch-size", "8", "--steps", "2"])
    assert {bench.default(args, "batch_size", bench.BATCH, b) for b in bench.BATCH} == {8}
    assert {bench.default(args, "steps", bench.STEPS, b) for b in bench.STEPS} == {2}
