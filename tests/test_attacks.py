"""Tests for attacks.py: invariants on random models, closed-form linear models, the ensemble,
degenerate models, early stopping, determinism and argument checks; CW, TPGD, DI and transfer
against loops written out here from their sources (APT, torchattacks) and closed-form gradients."""
import pytest
import torch
import torch.nn.functional as F

import attacks as A

EPS = 8 / 255
C = 10


def tiny_cnn(seed=0, dtype=torch.float32):
    """A random conv net from (B, 3, 8, 8) images to 10 logits."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, C))
    return net.to(dtype).eval()


def images(n=24, seed=0, dtype=torch.float32):
    """Random images in [0,1] with some pixels exactly on the box edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=dtype)
    return torch.where(x < 0.1, torch.zeros_like(x), torch.where(x > 0.9, torch.ones_like(x), x))


def labels_mostly_right(model, x):
    """The model's own predictions, with every fourth label changed (clean mistakes)."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % C
    return y


# name -> (attack(model, x, y, eps), norm); steps and queries reduced to keep the tests fast
ATTACKS = {
    "fgsm": (lambda m, x, y, e: A.fgsm(m, x, y, e), "linf"),
    "pgd": (lambda m, x, y, e: A.pgd(m, x, y, e, e / 4, 10, seed=0), "linf"),
    "pgd-plain": (lambda m, x, y, e: A.pgd(m, x, y, e, e / 4, 10, early_stop=False), "linf"),
    "pgd-l2": (lambda m, x, y, e: A.pgd(m, x, y, 0.5, 0.1, 10, norm="l2", seed=0), "l2"),
    "cw": (lambda m, x, y, e: A.cw(m, x, y, e, e / 4, 10), "linf"),
    "cw-plain": (lambda m, x, y, e: A.cw(m, x, y, e, e / 4, 10, kappa=1.0, random_start=True,
                                         early_stop=False, seed=0), "linf"),
    "tpgd": (lambda m, x, y, e: A.tpgd(m, x, y, e, e / 4, 10, seed=0), "linf"),
    "transfer": (lambda m, x, y, e: A.transfer(m, x, y, e, m, e / 4, 10, diversity=0.5, seed=0),
                 "linf"),  # the model as its own surrogate: DI-FGSM on it
    "apgd-ce": (lambda m, x, y, e: A.apgd(m, x, y, e, steps=10, restarts=2), "linf"),
    "apgd-dlr": (lambda m, x, y, e: A.apgd(m, x, y, e, steps=10, loss="dlr", eot=2), "linf"),
    "apgd-l2": (lambda m, x, y, e: A.apgd(m, x, y, 0.5, steps=10, norm="l2"), "l2"),
    "apgd-t": (lambda m, x, y, e: A.apgd_targeted(m, x, y, e, steps=10, n_targets=3), "linf"),
    "fab-t": (lambda m, x, y, e: A.fab_targeted(m, x, y, e, steps=10, n_targets=3), "linf"),
    "square": (lambda m, x, y, e: A.square(m, x, y, e, queries=100), "linf"),
    "aa": (lambda m, x, y, e: A.autoattack(m, x, y, e, steps=10, queries=100), "linf"),
    "aa-rand": (lambda m, x, y, e: A.autoattack(m, x, y, e, "rand", steps=3), "linf"),
}


def within_ball(x_adv, x, eps, norm):
    d = (x_adv - x).flatten(1)
    radius = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    bound = eps if norm == "linf" else 0.5
    return bool((radius <= bound + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ATTACKS)
def test_invariants(name, dtype):
    attack, norm = ATTACKS[name]
    model, x = tiny_cnn(dtype=dtype), images(dtype=dtype)
    y = labels_mostly_right(model, x)
    x_before, y_before = x.clone(), y.clone()
    x_adv = attack(model, x, y, EPS)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert within_ball(x_adv, x, EPS, norm)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # inputs left alone
    with torch.no_grad():
        wrong_before, wrong_after = model(x).argmax(1) != y, model(x_adv).argmax(1) != y
    if name != "transfer":  # transfer hands clean errors a crafted image too (its docstring)
        assert wrong_after[wrong_before].all()  # robust accuracy <= clean accuracy, point by point
    if name != "fgsm":
        assert wrong_after.sum() > wrong_before.sum()  # a random net at 8/255 breaks somewhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ATTACKS)
def test_invariants_on_cuda(name):
    attack, norm = ATTACKS[name]
    model, x = tiny_cnn().cuda(), images().cuda()
    y = labels_mostly_right(model, x)
    x_adv = attack(model, x, y, EPS)
    assert x_adv.device == x.device and x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and within_ball(x_adv, x, EPS, norm)


# ----------------------------------------------------------------------------- linear models

def linear_model(norm="linf", n=60, seed=0, scale=10.0):
    """A linear 10-class model on (n, 3, 8, 8) inputs in [0.3, 0.7] and the closed-form smallest
    perturbation that fools it: min_j margin_j / ||w_y - w_j||_q (q dual to the attack norm)."""
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(C, 3 * 8 * 8, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)

    def model(v):
        return v.flatten(1) @ w.T

    z = model(x)
    y = z.argmax(1)
    margin = z.gather(1, y[:, None]) - z
    dual = (w[y][:, None] - w[None]).norm(p=1 if norm == "linf" else 2, dim=-1)
    d_min = (margin / dual).masked_fill(F.one_hot(y, C).bool(), float("inf")).amin(1)
    return model, x, y, d_min


LINEAR = {
    "pgd": lambda m, x, y, e, norm: A.pgd(m, x, y, e, e / 10, 30, norm=norm, seed=0),
    "pgd-plain": lambda m, x, y, e, norm: A.pgd(m, x, y, e, e / 10, 30, norm=norm,
                                                 early_stop=False, seed=0),
    "apgd-ce": lambda m, x, y, e, norm: A.apgd(m, x, y, e, steps=30, norm=norm),
    "cw": lambda m, x, y, e, norm: A.cw(m, x, y, e, e / 10, 30),
    "apgd-dlr": lambda m, x, y, e, norm: A.apgd(m, x, y, e, steps=30, loss="dlr", norm=norm),
    "apgd-t": lambda m, x, y, e, norm: A.apgd_targeted(m, x, y, e, steps=30, norm=norm),
    "aa": lambda m, x, y, e, norm: A.autoattack(m, x, y, e, steps=30, queries=50),
}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_model_breaks_exactly_the_points_below_eps(name, norm):
    if name in ("aa", "cw") and norm == "l2":
        pytest.skip(f"{name} is L-inf only")
    model, x, y, d_min = linear_model(norm)
    eps = d_min.median().item()  # half the points can be broken
    x_adv = LINEAR[name](model, x, y, eps, norm)
    broken = model(x_adv).argmax(1) != y
    assert broken[d_min < 0.98 * eps].all()  # a 2% band around eps is left open
    assert not broken[d_min > eps * (1 + 1e-6)].any()
    assert 15 < int(broken.sum()) < 45


def test_fab_finds_the_closed_form_minimal_perturbation():
    model, x, y, d_min = linear_model()
    x_adv = A.fab_targeted(model, x, y, 1.0, steps=20, early_stop=False)  # eps=1: whole box
    assert (model(x_adv).argmax(1) != y).all()
    ratio = (x_adv - x).flatten(1).abs().amax(1) / d_min
    assert ratio.min() >= 1 - 1e-6 and ratio.max() <= 1.02


def test_fab_breaks_exactly_the_points_below_eps():
    model, x, y, d_min = linear_model()
    eps = d_min.median().item()
    broken = model(A.fab_targeted(model, x, y, eps, steps=20)).argmax(1) != y
    assert broken[d_min < 0.98 * eps].all() and not broken[d_min > eps * (1 + 1e-6)].any()


def test_square_breaks_the_easy_points_and_no_others():
    model, x, y, d_min = linear_model()
    eps = d_min.median().item()
    broken = model(A.square(model, x, y, eps, queries=300)).argmax(1) != y
    assert broken[d_min < 0.25 * eps].all() and not broken[d_min > eps * (1 + 1e-6)].any()


def test_hyperplane_projection_is_the_smallest_linf_step():
    g = torch.Generator().manual_seed(0)
    p, w = torch.rand(50, 30, generator=g, dtype=torch.float64), torch.randn(50, 30, generator=g,
                                                                             dtype=torch.float64)
    w[:5, :10] = 0  # coordinates the hyperplane ignores
    c = 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
    d = A._project_hyperplane(p, w, c)
    # the largest |w.d| reachable with ||d||_inf <= lam inside the box, found by bisection
    room = torch.where(w * c[:, None] > 0, 1 - p, p)
    lo, hi = torch.zeros(50, dtype=torch.float64), torch.ones(50, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = (w.abs() * torch.minimum(mid[:, None], room)).sum(1) >= c.abs()
        lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
    reachable = (w.abs() * room).sum(1) >= c.abs()
    assert reachable.sum() > 40
    assert torch.allclose((w * d).sum(1)[reachable], c[reachable], atol=1e-9)
    assert torch.allclose(d.abs().amax(1)[reachable], hi[reachable], atol=1e-9)
    assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
    full_move = torch.where(w != 0, room, torch.zeros_like(room))
    assert torch.allclose(d.abs()[~reachable], full_move[~reachable])


# ----------------------------------------------------------------------------- models that compute in fp16

def cosine_classifier(n=40, seed=0, eps=16 / 255):
    """CLIP's head at toy size: images (n, 3, 8, 8) -> a linear embedding (16) -> normalised -> 100 x
    cosine with 10 orthonormal class embeddings, computed in a dtype of the caller's: make(dtype) is
    the model (logits returned in float32, as evaluate.py returns them). Its decisions are linear
    (argmax of e.c_k), so d_min, the smallest L-inf perturbation that fools a point, has the linear
    model's closed form (the box ignored). Every point is confident (logit margins ~25-60: its softmax
    gradient is below fp16's smallest number); even points have d_min ~0.2-0.6 eps, odd ones > eps.
    -> (make, x, y, d_min)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 192, generator=g, dtype=torch.float64) / 192 ** 0.5
    b = -0.5 * w.sum(1)  # the embedding of a grey image is 0
    c = torch.linalg.qr(torch.randn(16, C, generator=g, dtype=torch.float64))[0].T  # (C, 16)
    y, j = torch.arange(n) % C, (torch.arange(n) + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
    a = 0.35 + 0.25 * torch.rand(n, generator=g, dtype=torch.float64)  # e ~ c_y + a c_j: margin 100 (1-a)/|e|
    r = torch.where(torch.arange(n) % 2 == 0, 0.2 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64),
                    1.6 + torch.rand(n, generator=g, dtype=torch.float64))  # d_min / eps before the box
    lin_w = c @ w  # the linear classifier: class scores x.flatten() @ lin_w.T + c @ b
    scale = r * eps * (lin_w[y] - lin_w[j]).abs().sum(1) / (1 - a)
    e = scale[:, None] * (c[y] + a[:, None] * c[j])
    x = (0.5 + e @ torch.linalg.pinv(w).T).clamp(0, 1)
    scores = x @ lin_w.T + c @ b
    margin = scores.gather(1, y[:, None]) - scores
    dual = (lin_w[y][:, None] - lin_w[None]).abs().sum(-1)
    d_min = (margin / dual).masked_fill(F.one_hot(y, C).bool(), float("inf")).amin(1)

    def make(dtype):
        wd, bd, cd = w.to(dtype), b.to(dtype), c.to(dtype)
        return lambda v: (100 * F.normalize(v.flatten(1).to(dtype) @ wd.T + bd, dim=1) @ cd.T).float()
    return make, x.float().view(n, 3, 8, 8), y, d_min


PRECISION_RUNS = {
    "pgd": lambda m, x, y, e: A.pgd(m, x, y, e, 2 / 255, 20, seed=0),
    "pgd-plain": lambda m, x, y, e: A.pgd(m, x, y, e, 2 / 255, 20, early_stop=False, seed=0),
    "cw": lambda m, x, y, e: A.cw(m, x, y, e, 2 / 255, 20),
    "transfer": lambda m, x, y, e: A.transfer(m, x, y, e, m, 2 / 255, 20),  # DI-FGSM on the model itself
    "apgd-ce": lambda m, x, y, e: A.apgd(m, x, y, e, steps=20),
    "apgd-t": lambda m, x, y, e: A.apgd_targeted(m, x, y, e, steps=20),
    "aa": lambda m, x, y, e: A.autoattack(m, x, y, e, steps=20, queries=100),
}


def test_attacks_break_the_same_points_when_the_model_computes_in_fp16():
    """The measured bug: a confident point's softmax gradient underflowed to 0 in the fp16 backward,
    and PGD and APGD-CE broke none of the points they break on the same model in fp32."""
    eps = 16 / 255
    make, x, y, d_min = cosine_classifier(eps=eps)
    assert not ((d_min > 0.7 * eps) & (d_min < 1.2 * eps)).any()  # each point clearly breakable or not
    breakable = d_min < eps
    assert int(breakable.sum()) == 20
    for dtype in (torch.float32, torch.float16):
        model = make(dtype)
        z = model(x).sort(1, descending=True)
        assert torch.equal(z.indices[:, 0], y) and (z.values[:, 0] - z.values[:, 1]).min() > 20
        for name, run in PRECISION_RUNS.items():
            broken = model(run(model, x, y, eps)).argmax(1) != y
            assert torch.equal(broken, breakable), (name, dtype)


def test_loss_grad_direction_is_the_fp32_models_in_any_precision():
    """On an fp32 model the step direction is the plain autograd gradient's (FAB's margin gradient is
    that gradient itself); on the fp16 twin of a confident model it is the float64 model's, where it
    was 0; EOT weighs each pass by its true gradient's size."""
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    t = (y + 3) % C
    for loss_fn in (A._ce, A._dlr, A._dlr_targeted, A._target_margin):
        _, g, _ = A._loss_grad(model, x, y, loss_fn, t)
        v = x.clone().requires_grad_(True)
        (plain,) = torch.autograd.grad(loss_fn(model(v), y, t).sum(), v)
        assert (plain != 0).float().mean() > 0.9
        nz = plain != 0
        assert torch.equal(g.sign()[nz], plain.sign()[nz]), loss_fn.__name__
        k = plain.flatten(1).norm(dim=1) > 0  # DLR of a point whose y is z_pi3 is flat up to its 1e-12
        factor = g[k].flatten(1).norm(dim=1) / plain[k].flatten(1).norm(dim=1)  # one factor > 0 per point
        assert torch.allclose(g[k], plain[k] * factor.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6 * g.abs().max())
        if loss_fn is A._target_margin:
            assert torch.equal(g, plain)
    make, x, y, _ = cosine_classifier()
    v = x.double().requires_grad_(True)
    (exact,) = torch.autograd.grad(A._ce(make(torch.float64)(v).double(), y).sum(), v)
    for dtype in (torch.float32, torch.float16):
        _, g, _ = A._loss_grad(make(dtype), x, y, A._ce)
        agree = (g.sign() == exact.sign()).float().mean()
        assert agree > (0.99 if dtype == torch.float16 else 0.999), (dtype, agree)
    # EOT: a model that alternates between two confidences; pass 2's gradient is e^-40 of pass 1's
    calls = []

    def alternating(v):
        calls.append(1)
        return make(torch.float32)(v) * (1 if len(calls) % 2 else 2)
    _, g, _ = A._loss_grad(alternating, x, y, A._ce, eot=2)
    v = x.double().requires_grad_(True)
    z = make(torch.float64)(v).double()
    (true,) = torch.autograd.grad((A._ce(z, y) + A._ce(2 * z, y)).sum(), v)
    assert (g.sign() == true.sign()).float().mean() > 0.999


# ----------------------------------------------------------------------------- ensemble

def test_autoattack_is_at_least_as_strong_as_each_member():
    model, x = tiny_cnn(1), images(40, seed=1)
    y = labels_mostly_right(model, x)
    eps = 2 / 255

    def robust(x_adv):
        with torch.no_grad():
            return int((model(x_adv).argmax(1) == y).sum())

    x_adv, info = A.autoattack(model, x, y, eps, steps=20, queries=200, return_info=True)
    members = [A.apgd(model, x, y, eps, steps=20), A.apgd_targeted(model, x, y, eps, steps=20),
               A.fab_targeted(model, x, y, eps, steps=20), A.square(model, x, y, eps, queries=200)]
    assert robust(x_adv) == info["robust"]
    assert all(info["robust"] <= robust(m) for m in members)
    assert info["clean"] == robust(x) == 30
    assert info["clean"] - info["apgd-ce"] - info["apgd-t"] - info["fab-t"] - info["square"] \
        == info["robust"]
    assert 0 < info["robust"] < info["clean"]
    assert list(info) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square", "robust"]


def test_apgd_ce_t_is_apgd_then_apgd_t_on_the_survivors_and_never_stronger_than_autoattack():
    model, x = tiny_cnn(1), images(40, seed=1)
    y = labels_mostly_right(model, x)
    eps = 2 / 255

    def fooled(v):
        with torch.no_grad():
            return model(v).argmax(1) != y

    x_adv, info = A.autoattack(model, x, y, eps, "apgd-ce+apgd-t", seed=3, steps=20, return_info=True)
    # by hand: APGD-CE on every point, APGD-T on those it left robust; a point keeps its first adversarial
    correct = ~fooled(x)
    ce = A.apgd(model, x, y, eps, steps=20, seed=3)
    by_ce = correct & fooled(ce)
    i = (correct & ~by_ce).nonzero()[:, 0]
    t = A.apgd_targeted(model, x[i], y[i], eps, steps=20, seed=3)
    by_t = torch.zeros_like(correct)
    by_t[i] = model(t).argmax(1) != y[i]
    expected = torch.where(by_ce[:, None, None, None], ce, x)
    expected[i] = torch.where(by_t[i, None, None, None], t, x[i])
    assert torch.equal(x_adv, expected)
    assert info == {"clean": 30, "apgd-ce": int(by_ce.sum()), "apgd-t": int(by_t.sum()),
                    "robust": int((correct & ~fooled(x_adv)).sum())}
    assert info["apgd-ce"] > 0 and info["apgd-t"] > 0 and info["robust"] > 0
    # standard AutoAttack runs the same two members first, then FAB-T and Square on what is left
    x_aa, aa = A.autoattack(model, x, y, eps, seed=3, steps=20, queries=200, return_info=True)
    assert not (~fooled(x_adv) & fooled(x)).any()
    assert (fooled(x_aa) >= fooled(x_adv)).all() and aa["robust"] <= info["robust"]
    assert (aa["apgd-ce"], aa["apgd-t"]) == (info["apgd-ce"], info["apgd-t"])


# ----------------------------------------------------------------------------- degenerate models

class Counting:
    """Wraps a model and counts its forward calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x):
        self.calls += 1
        return self.model(x)


def constant_logits(x):
    """Logits that ignore the image: zero gradient everywhere."""
    return torch.arange(C, dtype=x.dtype).expand(len(x), C)


def constant_in_graph(x):
    """Logits that depend on x only through a zero factor: a zero, not a missing, gradient."""
    return constant_logits(x) + 0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("model", [constant_logits, constant_in_graph])
@pytest.mark.parametrize("name", ATTACKS)
def test_zero_gradient_model_does_not_crash(name, model):
    attack, norm = ATTACKS[name]
    x = images(8)
    y = torch.full((8,), C - 1)  # right everywhere, and nothing can change that
    x_adv = attack(model, x, y, EPS)
    assert torch.isfinite(x_adv).all() and within_ball(x_adv, x, EPS, norm)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", [n for n in ATTACKS if n not in ("fgsm", "pgd-plain", "cw-plain", "transfer")])
def test_model_wrong_everywhere_costs_one_forward_pass(name):
    model = Counting(tiny_cnn())
    x = images(8)
    with torch.no_grad():
        y = (model.model(x).argmax(1) + 1) % C
    x_adv = ATTACKS[name][0](model, x, y, EPS)
    assert model.calls == 1  # the clean check, no attack iterations
    assert torch.equal(x_adv, x)


# ----------------------------------------------------------------------------- PGD for training

def test_plain_pgd_is_the_fixed_step_loop():
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    x_ref = x.clone()
    for _ in range(5):
        x_ref.requires_grad_(True)
        loss = F.cross_entropy(model(x_ref), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_ref)
        x_ref = torch.min(torch.max(x_ref.detach() + EPS / 4 * g.sign(), x - EPS), x + EPS)
        x_ref = x_ref.clamp(0, 1)
    x_adv = A.pgd(model, x, y, EPS, EPS / 4, 5, random_start=False, early_stop=False)
    assert torch.allclose(x_adv, x_ref, atol=1e-6)


def test_pgd_momentum_is_fares_rule():
    """momentum=0 is plain PGD; momentum > 0 is chs20/RobustVLM's rule, written out here for both norms, and
    with early stopping each point follows the same path until it is fooled. Under L-inf,
    sign(0.9 v + sign(g)) is sign(g) wherever g != 0: the velocity only moves pixels whose gradient
    is 0, here those under 0.4."""
    net, x = tiny_cnn(), images()
    y = labels_mostly_right(net, x)
    gen = torch.Generator().manual_seed(2)
    for norm, eps, alpha in (("linf", EPS, EPS / 4), ("l2", 0.5, 0.1)):
        model = (lambda v: net(v.clamp(min=0.4))) if norm == "linf" else net
        start = (x + eps / 4 * torch.randn(x.shape, generator=gen)).clamp(0, 1)

        def unit(g):
            return g.sign() if norm == "linf" else F.normalize(g.flatten(1), dim=1).view_as(g)

        def project(v):
            d = v - x
            d = d.clamp(-eps, eps) if norm == "linf" else d.flatten(1).renorm(2, 0, eps).view_as(d)
            return (x + d).clamp(0, 1)

        x_ref, velocity, fooled = project(start), torch.zeros_like(x), torch.zeros(len(x), dtype=torch.bool)
        for _ in range(6):
            x_ref.requires_grad_(True)
            logits = model(x_ref)
            fooled |= logits.argmax(1) != y
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_ref)
            velocity = unit(0.9 * velocity + unit(g))
            x_ref = project(x_ref.detach() + alpha * velocity)
        fooled |= model(x_ref).argmax(1) != y
        args = (model, x, y, eps, alpha, 6)
        plain = A.pgd(*args, norm=norm, early_stop=False, x_init=start)
        assert torch.equal(A.pgd(*args, norm=norm, early_stop=False, x_init=start, momentum=0.0), plain)
        fare = A.pgd(*args, norm=norm, early_stop=False, x_init=start, momentum=0.9)
        assert torch.allclose(fare, x_ref, atol=1e-6)
        gap = (fare - plain).flatten(1)
        assert (gap.abs().amax(1) if norm == "linf" else gap.norm(dim=1)).max() > 1e-2  # momentum matters
        stopped = A.pgd(*args, norm=norm, x_init=start, momentum=0.9)
        assert 0 < int(fooled.sum()) < len(x)
        assert torch.allclose(stopped[~fooled], x_ref[~fooled], atol=1e-6)
        assert (model(stopped[fooled]).argmax(1) != y[fooled]).all()


@pytest.mark.parametrize("name", ["pgd", "pgd-plain", "cw", "tpgd", "apgd-ce", "apgd-t", "square"])
def test_first_fooling_iterate_is_kept_and_ends_the_attack(name):
    net, x = tiny_cnn(), images(8)
    with torch.no_grad():
        y = net(x).argmax(1)
    seen = []

    def model(v):  # right on every call but the third (after the clean check and the start)
        seen.append(v.detach().clone())
        return -net(v) if len(seen) == 3 else net(v)

    x_adv = ATTACKS[name][0](model, x, y, 1 / 255)  # too small for the start to fool it
    if name == "pgd-plain":  # training PGD runs every step and returns the last iterate
        assert len(seen) == 10 and not torch.equal(x_adv, seen[2])
    else:
        assert len(seen) == 3 and torch.equal(x_adv, seen[2])


def test_pgd_starts_from_x_init_projected_onto_the_ball():
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    start = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    projected = torch.min(torch.max(start, x - EPS), x + EPS)
    for early_stop in (False, True):
        x_adv = A.pgd(model, x, y, EPS, EPS / 4, 0, early_stop=early_stop, x_init=start)
        assert torch.allclose(x_adv[y == model(x).argmax(1)], projected[y == model(x).argmax(1)])
    a = A.pgd(model, x, y, EPS, EPS / 4, 3, early_stop=False, x_init=start)
    assert torch.equal(a, A.pgd(model, x, y, EPS, EPS / 4, 3, early_stop=False, x_init=start,
                                seed=5))  # no random draw when the start is given


def test_pgd_under_autocast_keeps_float32_and_leaves_parameter_grads_alone():
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = A.pgd(model, x, y, EPS, EPS / 4, 3, early_stop=False)
    assert x_adv.dtype == torch.float32 and within_ball(x_adv, x, EPS, "linf")
    assert (x_adv != x).any()
    assert all(p.grad is None for p in model.parameters())


def test_pgd_seed_none_uses_the_global_rng():
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    torch.manual_seed(5)
    a = A.pgd(model, x, y, EPS, EPS / 4, 2, early_stop=False)
    torch.manual_seed(5)
    b = A.pgd(model, x, y, EPS, EPS / 4, 2, early_stop=False)
    assert torch.equal(a, b) and not torch.equal(a, A.pgd(model, x, y, EPS, EPS / 4, 2,
                                                          early_stop=False))


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name", ["pgd", "cw-plain", "tpgd", "transfer", "apgd-ce", "apgd-t", "square", "aa"])
def test_same_seed_same_output(name):
    attack = ATTACKS[name][0]
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    assert torch.equal(attack(model, x, y, 1 / 255), attack(model, x, y, 1 / 255))


def test_seed_changes_the_random_start():
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    a, b = (A.apgd(model, x, y, 1 / 255, steps=5, seed=s) for s in (0, 1))
    c, d = (A.square(model, x, y, 1 / 255, queries=5, seed=s) for s in (0, 1))
    e, f = (A.tpgd(model, x, y, 1 / 255, steps=2, early_stop=False, seed=s) for s in (0, 1))
    g, h = (A.transfer(model, x, y, 1 / 255, model, steps=10, diversity=0.5, seed=s) for s in (0, 1))
    assert not torch.equal(a, b) and not torch.equal(c, d) and not torch.equal(e, f)
    assert not torch.equal(g, h)


# ----------------------------------------------------------------------------- APGD schedule

def test_apgd_checkpoints_follow_the_published_schedule():
    assert A._checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert A._checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("text, value", [("1/255", 1 / 255), ("4/255", 4 / 255), (" 8/255 ", 8 / 255),
                                         ("0.0039", 0.0039), (0.0039, 0.0039), ("0", 0.0),
                                         ("1", 1.0), (2 / 255, 2 / 255)])
def test_parse_eps_accepts_fractions_and_floats(text, value):
    assert A.parse_eps(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["-1/255", "-0.1", "2", "256/255", "abc", "", "1/0", "nan",
                                  "inf", "4/255/2", "4 / x", None])
def test_parse_eps_rejects_garbage_with_a_clear_message(text):
    with pytest.raises(ValueError, match="eps"):
        A.parse_eps(text)


def test_bad_arguments_raise_clear_errors():
    model, x = tiny_cnn(), images(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"images must be floats in \[0, 1\] \(got min -1.0\)"):
        A.pgd(model, x * 2 - 1, y, EPS, EPS, 1)
    with pytest.raises(ValueError, match="class indices"):
        A.apgd(model, x, y[:3], EPS)
    with pytest.raises(ValueError, match="norm"):
        A.pgd(model, x, y, EPS, EPS, 1, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        A.apgd(model, x, y, EPS, loss="hinge")
    with pytest.raises(ValueError, match="version"):
        A.autoattack(model, x, y, EPS, version="plus")
    with pytest.raises(ValueError, match="3 classes"):
        A.apgd(lambda v: model(v)[:, :2], x, y, EPS, loss="dlr")


def _one_line(e):
    """The message of a raised error, checked to be a single line."""
    text = str(e.value)
    assert "\n" not in text, text
    return text


# each public attack at its entry, with steps and queries small
ENTRIES = {
    "fgsm": lambda m, x, y, e: A.fgsm(m, x, y, e),
    "pgd": lambda m, x, y, e: A.pgd(m, x, y, e, 1 / 255, 1),
    "cw": lambda m, x, y, e: A.cw(m, x, y, e, steps=1),
    "tpgd": lambda m, x, y, e: A.tpgd(m, x, y, e, steps=1),
    "transfer": lambda m, x, y, e: A.transfer(m, x, y, e, m, steps=1),
    "apgd": lambda m, x, y, e: A.apgd(m, x, y, e, steps=1),
    "apgd_targeted": lambda m, x, y, e: A.apgd_targeted(m, x, y, e, steps=1),
    "fab_targeted": lambda m, x, y, e: A.fab_targeted(m, x, y, e, steps=1),
    "square": lambda m, x, y, e: A.square(m, x, y, e, queries=1),
    "autoattack": lambda m, x, y, e: A.autoattack(m, x, y, e, steps=1, queries=1),
}


@pytest.mark.parametrize("name", ENTRIES)
def test_images_must_be_floats_in_unit_range(name):
    model, x = tiny_cnn(), images(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        ENTRIES[name](model, (x * 255).round().to(torch.uint8), y, EPS)
    assert _one_line(e) == "images must be floats in [0, 1] (got uint8); divide by 255"
    with pytest.raises(ValueError) as e:
        ENTRIES[name](model, (x * 255).round(), y, EPS)
    assert _one_line(e) == "images must be floats in [0, 1] (got max 255.0); divide by 255"
    with pytest.raises(ValueError) as e:
        ENTRIES[name](model, x * 2 - 1, y, EPS)
    assert _one_line(e).startswith("images must be floats in [0, 1] (got min -1.0)")
    assert "normalise inside the model" in str(e.value)
    nan = x.clone()
    nan[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images must be floats in \[0, 1\] \(got NaN\)"):
        ENTRIES[name](model, nan, y, EPS)
    with pytest.raises(ValueError, match=r"images must be a float tensor .*\(got list\)"):
        ENTRIES[name](model, x.tolist(), y, EPS)


@pytest.mark.parametrize("name", [*ENTRIES, "pgd-plain", "apgd-ce+apgd-t"])
def test_labels_that_are_not_classes_of_the_model_are_refused(name):
    """An out-of-range label used to return x unchanged (the point counted as misclassified)."""
    attack = {**ENTRIES, "pgd-plain": lambda m, x, y, e: A.pgd(m, x, y, e, 1 / 255, 1, early_stop=False),
              "apgd-ce+apgd-t": lambda m, x, y, e: A.autoattack(m, x, y, e, "apgd-ce+apgd-t", steps=1)}[name]
    model, x = tiny_cnn(), images(4)
    for bad in (C, C + 5, -1):
        with pytest.raises(ValueError) as e:
            attack(model, x, torch.tensor([0, 1, bad, 2]), EPS)
        assert _one_line(e) == (f"label {bad} is not a class of the model, which gives 10 logits (classes 0 "
                                "to 9); check the labels against the class names")

@pytest.mark.parametrize("name", ENTRIES)
def test_eps_beyond_the_pixel_range_or_negative_is_refused(name):
    model, x = tiny_cnn(), images(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        ENTRIES[name](model, x, y, 8)
    assert _one_line(e) == "eps=8 is larger than the whole [0,1] pixel range; did you mean 8/255?"
    with pytest.raises(ValueError) as e:
        ENTRIES[name](model, x, y, -1 / 255)
    assert _one_line(e).startswith("eps=-0.00392157 must be >= 0")
    for bad in ("8/255", None, float("nan")):
        with pytest.raises(ValueError, match="eps.*number"):
            ENTRIES[name](model, x, y, bad)


def test_alpha_is_checked_like_eps():
    model, x = tiny_cnn(), images(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        A.pgd(model, x, y, EPS, 2, 10)
    assert _one_line(e) == "alpha=2 is larger than the whole [0,1] pixel range; did you mean 2/255?"
    with pytest.raises(ValueError, match="alpha=-0.1 must be >= 0"):
        A.pgd(model, x, y, EPS, -0.1, 10)
    with pytest.raises(ValueError, match="alpha.*number"):
        A.pgd(model, x, y, EPS, "1/255", 10)


def test_l2_radius_is_bounded_by_the_box_diagonal():
    model, x = tiny_cnn(), images(4)
    y = labels_mostly_right(model, x)
    x_adv = A.pgd(model, x, y, 3.0, 1.5, 2, norm="l2", seed=0)   # 3 > 1 is a fine L2 radius
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 3.0 + 1e-5).all() and (x_adv != x).any()
    with pytest.raises(ValueError) as e:
        A.pgd(model, x, y, 20.0, 1.0, 2, norm="l2")
    assert _one_line(e).startswith("eps=20 is larger than the L2 diameter of the [0,1] box "
                                   "(13.9 for images of 192 values)")
    with pytest.raises(ValueError, match="eps=20 is larger"):
        A.apgd(model, x, y, 20.0, norm="l2")


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: A.pgd(m, x, y, EPS, EPS, -1), "steps must be an integer >= 0, got -1"),
    (lambda m, x, y: A.pgd(m, x, y, EPS, EPS, 2.5), "steps must be an integer >= 0, got 2.5"),
    (lambda m, x, y: A.pgd(m, x, y, EPS, EPS, "10"), "steps must be an integer >= 0, got '10'"),
    (lambda m, x, y: A.apgd(m, x, y, EPS, steps=-5), "steps must be an integer >= 0, got -5"),
    (lambda m, x, y: A.apgd(m, x, y, EPS, restarts=0), "restarts must be an integer >= 1, got 0"),
    (lambda m, x, y: A.apgd(m, x, y, EPS, eot=0), "eot must be an integer >= 1, got 0"),
    (lambda m, x, y: A.apgd_targeted(m, x, y, EPS, n_targets=0),
     "n_targets must be an integer >= 1, got 0"),
    (lambda m, x, y: A.apgd_targeted(m, x, y, EPS, steps=-1), "steps must be an integer >= 0"),
    (lambda m, x, y: A.fab_targeted(m, x, y, EPS, n_targets=-2),
     "n_targets must be an integer >= 1, got -2"),
    (lambda m, x, y: A.fab_targeted(m, x, y, EPS, steps=-1), "steps must be an integer >= 0"),
    (lambda m, x, y: A.square(m, x, y, EPS, queries=-1), "queries must be an integer >= 0, got -1"),
    (lambda m, x, y: A.square(m, x, y, EPS, p_init=0), "p_init must be in (0, 1], got 0"),
    (lambda m, x, y: A.autoattack(m, x, y, EPS, steps=-1), "steps must be an integer >= 0"),
    (lambda m, x, y: A.autoattack(m, x, y, EPS, queries=-1), "queries must be an integer >= 0"),
    (lambda m, x, y: A.pgd(m, x, y.float(), EPS, EPS, 1), "y must be integer class indices"),
    (lambda m, x, y: A.pgd(m, x, y, EPS, EPS, 1, x_init=x[:2]),
     "x_init must be a tensor of the images' shape (4, 3, 8, 8), got (2, 3, 8, 8)"),
    (lambda m, x, y: A.pgd(m, x, y, EPS, EPS, 1, momentum=-0.5),
     "momentum must be a number >= 0 such as 0.9 (FARE's), got -0.5"),
    (lambda m, x, y: A.pgd(m, x, y, EPS, EPS, 1, momentum="0.9"),
     "momentum must be a number >= 0 such as 0.9 (FARE's), got '0.9'"),
    (lambda m, x, y: A.cw(m, x, y, EPS, kappa=-1), "kappa must be a number >= 0"),
    (lambda m, x, y: A.cw(m, x, y, EPS, alpha=2), "alpha=2 is larger than the whole [0,1] pixel range"),
    (lambda m, x, y: A.cw(m, x, y, EPS, steps=-1), "steps must be an integer >= 0, got -1"),
    (lambda m, x, y: A.tpgd(m, x, y, EPS, alpha=-0.1), "alpha=-0.1 must be >= 0"),
    (lambda m, x, y: A.tpgd(m, x, y, EPS, steps=1.5), "steps must be an integer >= 0, got 1.5"),
    (lambda m, x, y: A.transfer(m, x, y, EPS, m, diversity=1.5),
     "the input diversity probability must be in [0, 1], got 1.5"),
    (lambda m, x, y: A.transfer(m, x, y, EPS, m, steps=-2), "steps must be an integer >= 0, got -2"),
    (lambda m, x, y: A.transfer(m, x[..., :6], y, EPS, m, diversity=0.5),
     "input diversity needs square images"),
])
def test_bad_counts_are_one_line_errors(call, message):
    model, x = tiny_cnn(), images(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        call(model, x, y)
    assert message in _one_line(e)


def test_parse_eps_suggests_the_fraction_for_a_whole_number():
    with pytest.raises(ValueError) as e:
        A.parse_eps("8")
    assert _one_line(e) == "eps '8' is larger than the whole [0,1] pixel range; did you mean 8/255?"
    with pytest.raises(ValueError) as e:
        A.parse_eps("256/255")
    assert "larger than the whole [0,1] pixel range" in _one_line(e) and "did you mean" not in str(e.value)
    for text in ("nan", "inf", "-inf", "1/0"):
        with pytest.raises(ValueError, match="is not a number"):
            A.parse_eps(text)
    with pytest.raises(ValueError, match=r"eps '-1/255' is negative"):
        A.parse_eps("-1/255")


# ----------------------------------------------------------------------------- pgd(loss=...)

def test_pgd_with_per_sample_ce_loss_equals_the_default():
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    ce = lambda z, t: F.cross_entropy(z, t, reduction="none")
    default = A.pgd(model, x, y, EPS, EPS / 4, 5, early_stop=False, seed=3)
    custom = A.pgd(model, x, y, EPS, EPS / 4, 5, early_stop=False, seed=3, loss=ce)
    assert torch.equal(custom, default) and not torch.equal(default, x)
    # L2 steps keep the gradient's rounding: the default's comes from a float64 loss, the custom one's
    # from a float32 loss; on a float64 model both are float64, bit for bit
    l2 = A.pgd(model, x, y, 0.5, 0.1, 5, norm="l2", early_stop=False, seed=3)
    custom = A.pgd(model, x, y, 0.5, 0.1, 5, norm="l2", early_stop=False, seed=3, loss=ce)
    assert torch.allclose(custom, l2, atol=1e-6) and not torch.equal(l2, x)
    model, x = tiny_cnn(dtype=torch.float64), images(dtype=torch.float64)
    l2 = A.pgd(model, x, y, 0.5, 0.1, 5, norm="l2", early_stop=False, seed=3)
    assert torch.equal(A.pgd(model, x, y, 0.5, 0.1, 5, norm="l2", early_stop=False, seed=3, loss=ce), l2)


def test_pgd_ascends_a_custom_embedding_loss():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3 * 8 * 8, generator=g, dtype=torch.float64)
    embed = lambda v: v.flatten(1) @ w.T                       # a linear "embedding" model (N, 16)
    x = images(12, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long)                      # unused by the loss
    target = embed(x) + torch.randn(12, 16, generator=g, dtype=torch.float64)
    sq_dist = lambda e, _: ((e - target) ** 2).sum(1)          # FARE-style loss, (N,)
    start = (x + EPS * (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1)).clamp(0, 1)
    # one step: the gradient of ||W v - t||^2 is 2 W^T (W v - t), so the step is its sign
    grad = (2 * (embed(start) - target) @ w).view_as(x)
    expected = torch.min(torch.max(start + EPS / 4 * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    one = A.pgd(embed, x, y, EPS, EPS / 4, 1, early_stop=False, x_init=start, loss=sq_dist)
    assert torch.allclose(one, expected, atol=1e-12)
    # more steps: the distance grows step after step and the iterates stay in the ball and box
    dist = [sq_dist(embed(start), y)]
    for steps in (1, 2, 4, 8):
        x_adv = A.pgd(embed, x, y, EPS, EPS / 4, steps, early_stop=False, x_init=start, loss=sq_dist)
        assert within_ball(x_adv, x, EPS, "linf") and x_adv.min() >= 0 and x_adv.max() <= 1
        dist.append(sq_dist(embed(x_adv), y))
    assert all((b > a).all() for a, b in zip(dist, dist[1:]))
    assert (dist[-1] > 2 * dist[0]).all()


def test_pgd_custom_loss_argument_checks():
    model, x = tiny_cnn(), images(4)
    y = torch.zeros(4, dtype=torch.long)
    ce = lambda z, t: F.cross_entropy(z, t, reduction="none")
    with pytest.raises(ValueError) as e:
        A.pgd(model, x, y, EPS, EPS, 1, loss=ce)   # early_stop defaults to True
    assert "early_stop=False" in _one_line(e)
    with pytest.raises(ValueError, match="loss must be a callable"):
        A.pgd(model, x, y, EPS, EPS, 1, early_stop=False, loss="kl")
    with pytest.raises(ValueError) as e:
        A.pgd(model, x, y, EPS, EPS, 1, early_stop=False, loss=lambda z, t: ce(z, t).sum())
    assert "one loss per image, shape (4,), got ()" in _one_line(e)


# ----------------------------------------------------------------------------- CW, TPGD, transfer

def one_hot_margin(z, y):
    """APT's CWLoss spelling of z_y - max_{j!=y} z_j: the other classes' max with y's logit pushed down
    by 10000 (TreeLLi/APT apt/evaluate.py)."""
    onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
    return (onehot * z).sum(1) - ((1 - onehot) * z - onehot * 10000).amax(1)


def test_cw_and_kl_gradients_are_their_closed_forms():
    """d/dz of APT's clamped margin is e_j* - e_y where z_y - z_j* + kappa > 0, else 0; d/dz of
    KL(p || softmax(z)) is softmax(z) - p. Through a model, _loss_grad steps along the autograd
    gradient of the same losses written directly."""
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(200, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (200,), generator=g)
    y[::2] = z[::2].argmax(1)  # half of the points right
    for kappa in (0.0, 2.0):
        k = torch.full((200,), kappa, dtype=torch.float64)
        v = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(A._cw(v, y, k).sum(), v)
        margin = one_hot_margin(z, y)
        active = margin + kappa > 0
        j = z.masked_fill(F.one_hot(y, C).bool(), float("-inf")).argmax(1)
        expected = torch.zeros_like(z)
        expected[active, j[active]], expected[active, y[active]] = 1.0, -1.0
        assert 30 < int(active.sum()) < 170  # both sides of the clamp
        assert torch.equal(grad, expected)
        assert torch.allclose(A._cw(z, y, k), -(margin + kappa).clamp(min=0))
    z_clean = 3 * torch.randn(200, C, generator=g, dtype=torch.float64)
    v = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(A._kl(v, y, z_clean).sum(), v)
    p, q = F.softmax(z_clean, 1), F.softmax(z, 1)
    assert torch.allclose(grad, q - p, atol=1e-12)
    assert torch.allclose(A._kl(z, y, z_clean), (p * (p.log() - q.log())).sum(1), atol=1e-12)
    assert A._kl(z_clean, y, z_clean).abs().max() < 1e-12
    # through a model: the step direction is the direct formulas' autograd gradient's
    model, x = tiny_cnn(), images()
    y = labels_mostly_right(model, x)
    with torch.no_grad():
        clean = model(images(seed=1))
    kappa = torch.full((len(x),), 1.0)
    direct = {A._cw: lambda z: -(one_hot_margin(z, y) + 1.0).clamp(min=0),
              A._kl: lambda z: F.kl_div(F.log_softmax(z, 1), F.softmax(clean, 1), reduction="none").sum(1)}
    for loss_fn, t in ((A._cw, kappa), (A._kl, clean)):
        _, step, _ = A._loss_grad(model, x, y, loss_fn, t)
        v = x.clone().requires_grad_(True)
        (plain,) = torch.autograd.grad(direct[loss_fn](model(v)).sum(), v)
        nz = plain != 0
        assert nz.float().mean() > 0.5 and torch.equal(step.sign()[nz], plain.sign()[nz])
        assert not step[~nz].any()


def test_cw_is_apts_pgd_on_the_clamped_margin():
    """APT's CW evaluation written out: from x, signed steps up -max(z_y - max_{j!=y} z_j + kappa, 0),
    projected onto the ball and box. Early stopping leaves the points never fooled on that path;
    kappa > 0 keeps pushing fooled points until their margin is below -kappa."""
    model, x, y, d_min = linear_model()
    eps = d_min.median().item()
    alpha, steps, final = eps / 8, 12, {}
    for kappa in (0.0, 20.0):
        x_ref, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
        for _ in range(steps):
            x_ref.requires_grad_(True)
            z = model(x_ref)
            fooled |= z.argmax(1) != y
            loss = -(one_hot_margin(z, y) + kappa).clamp(min=0)
            (g,) = torch.autograd.grad(loss.sum(), x_ref)
            x_ref = (x + (x_ref.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        fooled |= model(x_ref).argmax(1) != y
        plain = A.cw(model, x, y, eps, alpha, steps, kappa=kappa, early_stop=False)
        assert torch.allclose(plain, x_ref, rtol=0, atol=1e-12)
        stopped = A.cw(model, x, y, eps, alpha, steps, kappa=kappa)
        assert 10 < int(fooled.sum()) < len(x) - 10
        assert torch.allclose(stopped[~fooled], x_ref[~fooled], rtol=0, atol=1e-12)
        assert (model(stopped).argmax(1) != y)[fooled].all()
        final[kappa] = one_hot_margin(model(plain), y)
    both = (final[0.0] < 0) & (final[20.0] < 0)
    assert both.sum() > 10 and (final[20.0][both] < final[0.0][both]).all()
    assert (final[0.0][both] > -10).all()  # kappa 0: the gradient stops right past the boundary
    assert torch.equal(A.cw(model, x, y, eps, steps=3, early_stop=False),
                       A.cw(model, x, y, eps, eps / 4, 3, early_stop=False))  # alpha None: eps / 4, APT's


def test_tpgd_is_torchattacks_loop():
    """torchattacks.TPGD written out: start at x + 0.001 N(0, 1) (clamped to the box), then signed steps
    up KLDivLoss(sum)(log_softmax(model(adv)), softmax(model(x))), projected onto the ball and box. Early
    stopping leaves the points never fooled on that path; y is used only to score."""
    model, x = tiny_cnn(dtype=torch.float64), images(dtype=torch.float64)
    y = labels_mostly_right(model, x)
    eps, alpha, steps = 16 / 255, 4 / 255, 6
    gen = torch.Generator().manual_seed(3)
    x_ref = (x + 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype)).clamp(0, 1)
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    fooled = model(x).argmax(1) != y
    for _ in range(steps):
        x_ref.requires_grad_(True)
        logits = model(x_ref)
        fooled |= logits.argmax(1) != y
        cost = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(logits, 1), p_clean)
        (g,) = torch.autograd.grad(cost, x_ref)
        x_ref = (x + (x_ref.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    fooled |= model(x_ref).argmax(1) != y
    plain = A.tpgd(model, x, y, eps, alpha, steps, early_stop=False, seed=3)
    assert torch.allclose(plain, x_ref, rtol=0, atol=1e-12)
    other = torch.randint(0, C, y.shape, generator=gen)
    assert torch.equal(A.tpgd(model, x, other, eps, alpha, steps, early_stop=False, seed=3), plain)  # no labels
    stopped = A.tpgd(model, x, y, eps, alpha, steps, seed=3)
    assert 0 < int(fooled.sum()) < len(x)
    assert torch.allclose(stopped[~fooled], x_ref[~fooled], rtol=0, atol=1e-12)
    assert (model(stopped).argmax(1) != y)[fooled].all()
    # the start is projected onto the ball (torchattacks leaves that to the first step)
    tiny = 0.0005
    start = A.tpgd(model, x, y, tiny, steps=0, early_stop=False, seed=3)
    noise = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    assert (noise.abs() > tiny).float().mean() > 0.5
    assert torch.allclose(start, (x + noise.clamp(-tiny, tiny)).clamp(0, 1), rtol=0, atol=1e-15)


def ramp(n, s):
    """Images (n, 3, s, s) whose pixels grow with the column, 0.25 to 0.75, the same in every row."""
    return (0.25 + 0.5 * torch.arange(s, dtype=torch.float64) / (s - 1)).expand(n, 3, s, s).clone()


def test_tpgd_breaks_only_breakable_points_and_is_weaker_than_pgd():
    """TPGD ascends a divergence, not a margin: on the linear model it breaks only points within eps
    and fewer than PGD-CE; on the confident cosine classifier, fewer in fp16 than in fp32 (tpgd's
    docstring gives the counts)."""
    model, x, y, d_min = linear_model()
    eps = d_min.median().item()
    broken = model(A.tpgd(model, x, y, eps, eps / 10, 30, seed=0)).argmax(1) != y
    by_pgd = model(A.pgd(model, x, y, eps, eps / 10, 30, seed=0)).argmax(1) != y
    assert not broken[d_min > eps * (1 + 1e-6)].any() and 5 < int(broken.sum()) < int(by_pgd.sum())
    eps = 16 / 255
    make, x, y, d_min = cosine_classifier(eps=eps)
    broken = {dtype: make(dtype)(A.tpgd(make(dtype), x, y, eps, 2 / 255, 20, seed=0)).argmax(1) != y
              for dtype in (torch.float32, torch.float16)}
    assert not (broken[torch.float32] & (d_min > eps)).any()
    assert 0 < int(broken[torch.float16].sum()) <= int(broken[torch.float32].sum()) < 20


def test_diverse_inputs_is_a_random_shrink_and_zero_pad():
    """With probability p: a bilinear resize (align_corners=False: output pixel k samples the input at
    (k + 0.5) s / rnd - 0.5, clamped to the image) to rnd x rnd, rnd in [floor(0.9 s), s - 1], at a
    random offset in an s x s frame of zeros; one draw for the whole batch."""
    s = 40
    x, gen = ramp(2, s), torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert A.diverse_inputs(x, 0.0, gen) is x and torch.equal(gen.get_state(), state)  # p = 0: no draw
    sizes, offsets, changed = set(), set(), 0
    for _ in range(300):
        out = A.diverse_inputs(x, 1.0, gen)
        assert out.shape == x.shape and torch.equal(out[0], out[1])  # one draw per batch
        rows, cols = (out[0, 0] != 0).any(1).nonzero()[:, 0], (out[0, 0] != 0).any(0).nonzero()[:, 0]
        top, left, rnd = int(rows[0]), int(cols[0]), len(rows)
        assert len(cols) == rnd and int(rows[-1]) == top + rnd - 1 and int(cols[-1]) == left + rnd - 1
        around = out.clone()
        around[..., top:top + rnd, left:left + rnd] = 0
        assert not around.any()  # zeros around the block
        src = ((torch.arange(rnd, dtype=torch.float64) + 0.5) * s / rnd - 0.5).clamp(0, s - 1)
        expected = (0.25 + 0.5 * src / (s - 1)).expand(rnd, rnd)
        assert torch.allclose(out[0, 0, top:top + rnd, left:left + rnd], expected, atol=1e-12)
        sizes.add(rnd)
        offsets.add((rnd, top, left))
    assert sizes == {36, 37, 38, 39}  # [floor(0.9 * 40), 39]
    assert {(r, t, l) for r in sizes for t in range(s - r) for l in range(s - r)} == offsets
    for _ in range(400):
        changed += not torch.equal(A.diverse_inputs(x, 0.5, gen), x)
    assert 160 < changed < 240
    v = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(A.diverse_inputs(v, 1.0, gen).sum(), v)
    assert g.abs().sum() > 0  # differentiable: the surrogate's gradient reaches the image


def linear(w):
    """A linear classifier images (n, 3, s, s) -> logits (n, classes), weights w (classes, 3 s s) on v - 0.5."""
    return lambda v: (v - 0.5).flatten(1) @ w.T


def test_transfer_is_ifgsm_on_the_surrogate_and_scores_on_the_model():
    """Crafted on a surrogate (linear, noisy weights of the true ones) by I-FGSM written out here, the
    same images whatever the model; they break a model of similar weights far more than random signs
    of the same size do, and one of unrelated weights hardly more; the model is asked once."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(C, 192, generator=g, dtype=torch.float64)
    surrogate = linear(true + 0.5 * torch.randn(C, 192, generator=g, dtype=torch.float64))
    near = linear(true + 0.5 * torch.randn(C, 192, generator=g, dtype=torch.float64))
    far = linear(torch.randn(C, 192, generator=g, dtype=torch.float64))
    x = 0.3 + 0.4 * torch.rand(300, 3, 8, 8, generator=g, dtype=torch.float64)
    y = linear(true)(x).argmax(1)
    eps, alpha, steps = 0.01, 0.0025, 10
    x_ref = x.clone()
    for _ in range(steps):
        x_ref.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(surrogate(x_ref), y, reduction="sum"), x_ref)
        x_ref = (x + (x_ref.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    counted = Counting(near)
    x_adv = A.transfer(counted, x, y, eps, surrogate, alpha, steps)
    assert counted.calls == 1 and torch.allclose(x_adv, x_ref, rtol=0, atol=1e-12)
    assert torch.equal(A.transfer(far, x, y, eps, surrogate, alpha, steps), x_adv)
    noise = (x + eps * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)).clamp(0, 1)

    def robust(model, v):  # right on the clean image and on v
        return int(((model(x).argmax(1) == y) & (model(v).argmax(1) == y)).sum())

    clean = robust(near, x)
    assert robust(surrogate, x_adv) < 0.2 * robust(surrogate, x)
    assert clean > 150 and robust(near, x_adv) < 0.4 * clean and robust(near, noise) > 0.9 * clean
    assert robust(far, x) > 30 and robust(far, x_adv) > 0.8 * robust(far, x)
    with pytest.raises(ValueError) as e:
        A.transfer(near, x, y, eps, lambda v: surrogate(v)[:, :7], alpha, steps)
    assert _one_line(e) == ("the surrogate gives 7 logits, the model 10: a transfer attack needs a "
                            "surrogate of the same classes")


def test_transfer_with_diverse_inputs_is_di_fgsm_written_out():
    """DI-FGSM (torchattacks.DIFGSM, decay 0) written out with the draws diverse_inputs documents, in its
    order, from a generator seeded with the seed: at each step a coin below p, then rnd, top and left."""
    g = torch.Generator().manual_seed(1)
    s, n, p = 32, 40, 0.5
    surrogate = linear(torch.randn(C, 3 * s * s, generator=g, dtype=torch.float64))
    x = 0.3 + 0.4 * torch.rand(n, 3, s, s, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    eps, alpha, steps = 0.03, 0.01, 8
    draws, x_ref, resized = torch.Generator().manual_seed(7), x.clone(), 0
    for _ in range(steps):
        x_ref.requires_grad_(True)
        v = x_ref
        if torch.rand((), generator=draws) < p:
            rnd = int(torch.randint(int(0.9 * s), s, (), generator=draws))
            top, left = (int(torch.randint(0, s - rnd, (), generator=draws)) for _ in range(2))
            v = F.pad(F.interpolate(v, size=(rnd, rnd), mode="bilinear", align_corners=False),
                      (left, s - rnd - left, top, s - rnd - top))
            resized += 1
        (grad,) = torch.autograd.grad(F.cross_entropy(surrogate(v), y, reduction="sum"), x_ref)
        x_ref = (x + (x_ref.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    x_adv = A.transfer(surrogate, x, y, eps, surrogate, alpha, steps, diversity=p, seed=7)
    assert 0 < resized < steps and torch.allclose(x_adv, x_ref, rtol=0, atol=1e-12)
    assert not torch.equal(x_adv, A.transfer(surrogate, x, y, eps, surrogate, alpha, steps))
