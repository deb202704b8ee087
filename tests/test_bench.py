"""bench.py: the peers' re-creation computes what ours computes; FLOP counts; memory bookkeeping; sane rows."""
import pytest
import torch

import bench
from clip.model import CLIP

MICRO = (32, 32, 2, 64, 16, 77, 49408, 32, 1, 2)  # 2 layers per tower, 4 patches
CPU = torch.device("cpu")
EPS = 4 / 255


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return CLIP(*MICRO).requires_grad_(False).eval()


def batch(model, n=6, seed=0):
    x = bench._images(model, n, CPU, seed)
    return x, torch.arange(n) % len(model.classnames)


def test_peers_compute_our_logits(backbone):
    model = bench.prompted(backbone, 7)
    x, _ = batch(model)
    with torch.no_grad():
        assert torch.equal(bench.peers_logits(model, CPU, "fp32")(x), bench.our_logits(model, CPU, "fp32")(x))


def test_peers_train_loss_and_gradients_are_ours(backbone):
    """Same PGD start, same adversarial images, same loss, same gradients on prompts and refiners."""
    model = bench.prompted(backbone, 5).train()
    x, y = batch(model)
    start = (x + EPS * (2 * bench._images(model, len(x), CPU, seed=1) - 1)).clamp(0, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for loss_fn in (bench.peers_train_loss, bench.our_train_loss):
        loss = loss_fn(model, x, y, start, EPS, EPS, 2)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_p, grads_p), (loss_o, grads_o) = results
    assert torch.allclose(loss_p, loss_o, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_p, grads_o))
    assert any(g.abs().sum() > 0 for g in grads_o)


@pytest.mark.parametrize("n_classes", [3, 40])
def test_analytic_flops_match_the_counter(backbone, n_classes):
    model = bench.prompted(backbone, n_classes)
    assert bench.attack_step_counted(model, 3, CPU) == bench.image_flops(model, batch=3)
    with torch.no_grad():
        assert bench.counted_flops(model.text_features) == bench.text_flops(model)


def test_vit_b16_flops_by_hand():
    """Zero-shot ViT-B/16, 1000 classes: 197 tokens, 12 blocks of width 768, no prompts."""
    torch.manual_seed(0)
    model = bench.nap.PromptedCLIP(CLIP(*bench.ARCHS["vit-b/16"]), [str(i) for i in range(1000)], bench.nap.PRESETS["zeroshot"])
    block = 24 * 197 * 768 ** 2 + 4 * 197 ** 2 * 768
    linear = 2 * (196 * 768 * 768 + 12 * 197 * 12 * 768 ** 2 + 768 * 512 + 512 * 1000)
    forward, backward = bench.image_flops(model)
    assert forward == 12 * block + 2 * (196 * 768 * 768 + 768 * 512 + 512 * 1000)
    assert backward == linear + 2 * (12 * 4 * 197 ** 2 * 768)
    assert 35e9 < forward < 36e9  # 17.6 GMAC
    assert bench.text_flops(model) == 2 * 1000 * (12 * (77 * 12 * 512 ** 2 + 2 * 77 ** 2 * 512) + 512 * 512)


def test_saved_bytes_count_storages_once_and_skip_weights():
    lin = torch.nn.Linear(100, 100)
    x = torch.rand(10, 100, requires_grad=True)
    assert bench.peak_memory(lambda: (x * x).sum(), CPU, lin) == x.nbytes  # x saved twice, one storage
    assert bench.peak_memory(lambda: lin(x).sum(), CPU, lin) == x.nbytes  # the weight is not counted

    def three_graphs():  # each is freed before the next is built, run or not: the peak is one of them
        torch.autograd.grad((x * 2).exp().sum(), x)
        (x * 3).exp().sum()  # exp saves its own output: holding it must not keep the graph alive
        (x * 4).exp().sum()
    assert bench.peak_memory(three_graphs, CPU, lin) == x.nbytes


def test_protocol_projection_formula():
    images = sum(n for n, _ in bench.PROTOCOL.values())
    assert images == 131_233
    assert bench.protocol_seconds(1.0, 0.0, step_flops=2, forward_flops=1) == pytest.approx(images * 102)
    assert bench.protocol_seconds(2.0, 1.0, 2, 1, work=0.5) == pytest.approx(images * 52 / 2 + 2089)


def test_bench_rows_are_sane(backbone):
    classes = (3, 30)
    rows = bench.bench_eval(backbone, classes, batch=4, steps=2, eps=EPS, device=CPU, precision="fp32", repeats=1)
    assert [r["classes"] for r in rows] == list(classes)
    for r in rows:
        assert min(r["text_s"], r["peers_s"], r["full_s"], r["ours_s"]) > 0
        assert 0 <= r["work"] <= 1 and 0 <= r["robust"] <= 100
        assert r["peers_mem"] > r["ours_mem"] > 0  # the peers also keep the text encoder's activations
    train = bench.bench_train(backbone, classes, batch=4, steps=1, eps=EPS, device=CPU, precision="fp32", repeats=1)
    assert all(r["peers_s"] > 0 and r["ours_s"] > 0 and r["peers_mem"] >= r["ours_mem"] > 0 for r in train)
    text = bench.bench_text(backbone, classes, CPU, "fp32", repeats=1)
    assert text[1]["flops"] == 10 * text[0]["flops"] and all(r["seconds"] > 0 for r in text)
