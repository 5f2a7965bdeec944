"""Knowledge-distillation and domain-adversarial losses against independent float64 / hand computations."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from hubtune.errors import InputError, ShapeError
from hubtune.tuning.losses import (
    ConditionalDomainAdversarialLoss, DistillationLoss, DomainAdversarialLoss, DomainDiscriminator,
    FeatureMatcher, GradientReverseLayer, IntermediateDistillation, JSDivergenceLoss, KLDivergenceLoss,
    LogitMSELoss, MultilinearMap, RandomizedMultilinearMap, WarmStartGRL, grad_reverse,
)

S = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
T = [[0.5, 2.5, -0.5], [2.0, 0.0, 1.0]]


def _softmax(row, temp):
    e = [math.exp(v / temp) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _logits(dtype=torch.float64):
    return torch.tensor(S, dtype=dtype), torch.tensor(T, dtype=dtype)


# ------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_matches_explicit_sum(temp):
    s, t = _logits()
    expected = temp ** 2 * sum(_kl(_softmax(tr, temp), _softmax(sr, temp)) for sr, tr in zip(S, T)) / 2
    assert KLDivergenceLoss(temperature=temp)(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_kl_t_squared_scaling_and_direction():
    s, t = _logits()
    raw = sum(_kl(_softmax(tr, 3.0), _softmax(sr, 3.0)) for sr, tr in zip(S, T)) / 2
    assert KLDivergenceLoss(3.0)(s, t).item() == pytest.approx(9.0 * raw, rel=1e-12)
    # KL(teacher || student), not the reverse
    rev = 9.0 * sum(_kl(_softmax(sr, 3.0), _softmax(tr, 3.0)) for sr, tr in zip(S, T)) / 2
    assert KLDivergenceLoss(3.0)(s, t).item() != pytest.approx(rev, rel=1e-6)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_js_matches_explicit_sum_and_scipy(temp):
    from scipy.spatial.distance import jensenshannon

    s, t = _logits()
    hand, sp = 0.0, 0.0
    for sr, tr in zip(S, T):
        p, q = _softmax(sr, temp), _softmax(tr, temp)
        m = [(a + b) / 2 for a, b in zip(p, q)]
        hand += 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
        sp += jensenshannon(p, q) ** 2  # natural base by default
    hand, sp = temp ** 2 * hand / 2, temp ** 2 * sp / 2
    got = JSDivergenceLoss(temperature=temp)(s, t).item()
    assert got == pytest.approx(hand, rel=1e-12)
    assert got == pytest.approx(sp, rel=1e-9)


def test_js_symmetric_zero_and_bounded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, generator=g, dtype=torch.float64)
    b = torch.randn(8, 5, generator=g, dtype=torch.float64)
    js = JSDivergenceLoss(temperature=2.0)
    assert js(a, b).item() == pytest.approx(js(b, a).item(), rel=1e-12)
    assert js(a, a).item() == pytest.approx(0.0, abs=1e-14)
    # disjoint one-hot-like predictions approach the bound log 2 * T^2 and never exceed it
    big = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]], dtype=torch.float64)
    val = js(big, big.flip(1)).item()
    assert val <= math.log(2) * 4.0 + 1e-12
    assert val == pytest.approx(math.log(2) * 4.0, rel=1e-9)
    assert math.isfinite(val)
    assert js(a * 50, b * 50).item() <= math.log(2) * 4.0


def test_js_is_not_symmetric_kl():
    s, t = _logits()
    sym = 0.5 * (KLDivergenceLoss(1.0)(s, t) + KLDivergenceLoss(1.0)(t, s)).item()
    assert JSDivergenceLoss(1.0)(s, t).item() < sym


def test_logit_mse():
    s, t = _logits()
    hand = sum((a - b) ** 2 for sr, tr in zip(S, T) for a, b in zip(sr, tr)) / 6
    assert LogitMSELoss()(s, t).item() == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("kind", ["kl", "js", "mse"])
def test_distillation_weighting_and_label_free(kind):
    s, t = _logits()
    y = torch.tensor([1, 2])
    ce = -sum(math.log(_softmax(sr, 1.0)[yi]) for sr, yi in zip(S, [1, 2])) / 2
    # the soft term from scipy / a hand formula, never from the loss classes under test
    from scipy.spatial.distance import jensenshannon
    from scipy.special import rel_entr

    p_s = [np.array(_softmax(r, 4.0)) for r in S]
    p_t = [np.array(_softmax(r, 4.0)) for r in T]
    soft = {"kl": 16.0 * np.mean([rel_entr(pt, ps).sum() for ps, pt in zip(p_s, p_t)]),
            "js": 16.0 * np.mean([jensenshannon(ps, pt) ** 2 for ps, pt in zip(p_s, p_t)]),  # natural log
            "mse": np.mean((np.array(S) - np.array(T)) ** 2)}[kind]
    loss = DistillationLoss(kind=kind, temperature=4.0, alpha_hard=0.3, alpha_soft=0.7)
    out = loss(s, t, y)
    assert set(out) == {"total", "hard", "soft"}
    assert out["hard"].item() == pytest.approx(ce, rel=1e-12)
    assert out["soft"].item() == pytest.approx(soft, rel=1e-9)
    assert out["total"].item() == pytest.approx(0.3 * ce + 0.7 * soft, rel=1e-9)
    free = loss(s, t)
    assert free["hard"].item() == 0.0
    assert free["total"].item() == pytest.approx(0.7 * soft, rel=1e-9)


def test_distillation_teacher_detached_and_grad_reaches_student():
    s, t = _logits()
    s.requires_grad_(True)
    t.requires_grad_(True)
    DistillationLoss("kl")(s, t, torch.tensor([0, 1]))["total"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_distillation_errors():
    s, t = _logits()
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        KLDivergenceLoss()(s, torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="2 dimensions"):
        JSDivergenceLoss()(s[0], t[0])
    with pytest.raises(InputError, match="temperature"):
        KLDivergenceLoss(temperature=0)
    with pytest.raises(InputError, match="kind"):
        DistillationLoss(kind="l1")
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        DistillationLoss()(s, t, torch.tensor([0, 3]))
    with pytest.raises(ShapeError, match="labels"):
        DistillationLoss()(s, t, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="both 0"):
        DistillationLoss(alpha_hard=0, alpha_soft=0)


# ------------------------------------------------------------------------------- feature matching
def test_feature_matcher_variants():
    assert FeatureMatcher((8,), (8,)).is_identity
    assert len(list(FeatureMatcher((4, 5, 5), (4, 5, 5)).parameters())) == 0
    lin = FeatureMatcher((8,), (16,))
    assert lin(torch.randn(3, 8)).shape == (3, 16) and isinstance(lin.proj, nn.Linear)
    conv = FeatureMatcher((4, 8, 8), (6, 4, 4))
    assert conv(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4) and isinstance(conv.proj, nn.Conv2d)
    assert conv.proj.kernel_size == (1, 1)
    pool = FeatureMatcher((4, 8, 8), (4, 2, 2))
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(pool(x), torch.nn.functional.avg_pool2d(x, 4))
    with pytest.raises(ShapeError, match=r"\(4, 8, 8\).*\(16,\)"):
        FeatureMatcher((4, 8, 8), (16,))
    with pytest.raises(ShapeError, match=r"\(B, 8\).*\(3, 9\)"):
        lin(torch.randn(3, 9))


def _cnn(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5),
    )


def test_intermediate_distillation_captures_right_modules():
    student, teacher = _cnn(4, 0), _cnn(8, 1)
    x = torch.randn(3, 3, 8, 8)
    kd = IntermediateDistillation({"1": "1", "3": "3", "5": "5"}, student, teacher, sample_input=x[:2])
    assert [m.in_shape for m in kd.matchers] == [(4, 8, 8), (8, 4, 4), (8,)]
    assert [m.out_shape for m in kd.matchers] == [(8, 8, 8), (16, 4, 4), (16,)]
    student(x)
    with torch.no_grad():
        teacher(x)
    assert torch.equal(kd.student_features["3"], student[:4](x))
    assert torch.equal(kd.teacher_features["5"], teacher[:6](x))
    # matchers are in kd.parameters(); the models are not
    kd_params = {id(p) for p in kd.parameters()}
    assert {id(p) for m in kd.matchers for p in m.parameters()} <= kd_params and kd_params
    assert not kd_params & {id(p) for p in [*student.parameters(), *teacher.parameters()]}
    # the loss is the mean of per-pair MSEs
    feats_s, feats_t = kd.student_features, kd.teacher_features
    hand = sum(torch.nn.functional.mse_loss(m(feats_s[k]), feats_t[k]) for m, k in zip(kd.matchers, "135")) / 3
    assert kd().item() == pytest.approx(hand.item(), rel=1e-6)
    kd.remove_hooks()
    student(x)
    assert kd.student_features == {}


def test_intermediate_distillation_kl_over_channels():
    student, teacher = _cnn(4, 0), _cnn(4, 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    student.double(), teacher.double()
    kd = IntermediateDistillation({"1": "1"}, student, teacher, loss="kl", temperature=2.0, sample_input=x)
    assert kd.matchers[0].is_identity
    hs, ht = student[:2](x), teacher[:2](x)
    student(x), teacher(x)
    p = torch.softmax(ht / 2, dim=1)
    q = torch.softmax(hs / 2, dim=1)
    hand = 4.0 * (p * (p.log() - q.log())).sum(dim=1).mean()
    assert kd().item() == pytest.approx(hand.item(), rel=1e-10)


def test_intermediate_distillation_loss_decreases():
    student, teacher = _cnn(4, 0), _cnn(8, 1)
    x = torch.randn(16, 3, 8, 8)
    kd = IntermediateDistillation({"3": "3", "5": "5"}, student, teacher, sample_input=x[:2])
    opt = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=1e-2)
    teacher.eval()
    losses = []
    for _ in range(30):
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = kd()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())


def test_intermediate_distillation_timm():
    timm = pytest.importorskip("timm")
    student = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    teacher = timm.create_model("resnet14t", pretrained=False, num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    kd = IntermediateDistillation({"layer3": "layer4"}, student, teacher, sample_input=x)
    assert kd.matchers[0].in_shape == (256, 2, 2) and kd.matchers[0].out_shape == (2048, 1, 1)
    student(x)
    with torch.no_grad():
        teacher(x)
    loss = kd()
    loss.backward()
    assert kd.matchers[0].proj.weight.grad is not None
    assert student.layer3[0].conv1.weight.grad is not None


def test_intermediate_distillation_errors():
    student, teacher = _cnn(4, 0), _cnn(8, 1)
    with pytest.raises(InputError, match="'layer9'"):
        IntermediateDistillation({"layer9": "1"}, student, teacher)
    with pytest.raises(InputError, match="teacher.*'1.weight'"):
        IntermediateDistillation({"1": "1.weight"}, student, teacher)
    kd = IntermediateDistillation({"1": "1"}, student, teacher)
    with pytest.raises(InputError, match="probe"):
        kd()
    kd.probe(torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match="teacher '1'"):
        student(torch.randn(2, 3, 8, 8))
        kd()
    with pytest.raises(InputError, match="loss"):
        IntermediateDistillation({"1": "1"}, student, teacher, loss="l1")
    # mapping to a vector layer from a feature map
    with pytest.raises(ShapeError, match="vectors"):
        IntermediateDistillation({"1": "5"}, student, teacher, sample_input=torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------------- gradient reversal
@pytest.mark.parametrize("coeff", [1.0, 0.3])
def test_grad_reverse(coeff):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, dtype=torch.float64)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.allclose(x.grad, -coeff * g)
    x.grad = None
    GradientReverseLayer(coeff)(x).backward(g)
    assert torch.allclose(x.grad, -coeff * g)


def test_warm_start_schedule():
    grl = WarmStartGRL(alpha=10.0, lo=0.1, hi=0.9, max_iters=10)

    def closed(p):
        return 2 * (0.9 - 0.1) / (1 + math.exp(-10 * p)) - (0.9 - 0.1) + 0.1

    assert grl.coeff == pytest.approx(0.1, abs=1e-15)
    for _ in range(5):
        grl.step()
    assert grl.coeff == pytest.approx(closed(0.5), rel=1e-12)
    for _ in range(5):
        grl.step()
    assert grl.coeff == pytest.approx(closed(1.0), rel=1e-12)
    x = torch.ones(2, requires_grad=True)
    grl(x).sum().backward()
    assert torch.allclose(x.grad, torch.full((2,), -closed(1.0)))
    # the schedule position is saved and restored
    fresh = WarmStartGRL(alpha=10.0, lo=0.1, hi=0.9, max_iters=10)
    fresh.load_state_dict(grl.state_dict())
    assert fresh.iter_num == 10
    auto = WarmStartGRL(max_iters=10, auto_step=True)
    auto(x), auto(x)
    assert auto.iter_num == 2


# --------------------------------------------------------------------------------------- DANN
def _bce_hand(d_s, d_t, w_s=None, w_t=None):
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    w_s = w_s or [1.0] * len(d_s)
    w_t = w_t or [1.0] * len(d_t)
    ls = sum(-w * math.log(sig(v)) for v, w in zip(d_s, w_s)) / len(d_s)
    lt = sum(-w * math.log(1 - sig(v)) for v, w in zip(d_t, w_t)) / len(d_t)
    return 0.5 * (ls + lt)


def test_dann_matches_hand_bce_and_accuracy():
    torch.manual_seed(0)
    disc = nn.Linear(4, 1).double()
    f_s = torch.randn(3, 4, dtype=torch.float64)
    f_t = torch.randn(5, 4, dtype=torch.float64)
    out = DomainAdversarialLoss(disc, GradientReverseLayer(1.0))(f_s, f_t)
    d_s = disc(f_s).flatten().tolist()
    d_t = disc(f_t).flatten().tolist()
    assert out["total"].item() == pytest.approx(_bce_hand(d_s, d_t), rel=1e-12)
    acc = (sum(v > 0 for v in d_s) + sum(v <= 0 for v in d_t)) / 8
    assert out["domain_acc"].item() == pytest.approx(acc)


def test_dann_gradients_reach_discriminator_and_reverse_into_features():
    torch.manual_seed(0)
    disc = DomainDiscriminator(4, hidden=8).double()
    f_s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def grads(grl):
        disc.zero_grad()
        f_s.grad = f_t.grad = None
        DomainAdversarialLoss(disc, grl)(f_s, f_t)["total"].backward()
        return f_s.grad.clone(), f_t.grad.clone(), [p.grad.clone() for p in disc.parameters()]

    plain_s, plain_t, plain_d = grads(nn.Identity())
    rev_s, rev_t, rev_d = grads(GradientReverseLayer(0.5))
    assert all(g.abs().sum() > 0 for g in rev_d)
    for a, b in zip(plain_d, rev_d):
        assert torch.allclose(a, b)
    assert torch.allclose(rev_s, -0.5 * plain_s) and torch.allclose(rev_t, -0.5 * plain_t)


def test_domain_discriminator_shape_and_errors():
    disc = DomainDiscriminator(7, hidden=16)
    assert disc(torch.randn(4, 7)).shape == (4, 1)
    with pytest.raises(ShapeError, match=r"\(4, 6\)"):
        disc(torch.randn(4, 6))
    with pytest.raises(ShapeError, match=r"\(3, 7\).*\(3, 6\)"):
        DomainAdversarialLoss(disc)(torch.randn(3, 7), torch.randn(3, 6))


# --------------------------------------------------------------------------------------- CDAN
def test_multilinear_map_is_outer_product():
    f, g = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    out = MultilinearMap()(f, g)
    for b in range(3):
        assert np.allclose(out[b].numpy(), np.outer(f[b].numpy(), g[b].numpy()).ravel(), rtol=0, atol=1e-15)
    assert out[1, 2 * 5 + 3] == f[1, 2] * g[1, 3]


def test_randomized_map_shape_determinism_and_formula():
    f, g = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a = RandomizedMultilinearMap(6, 4, output_dim=32, seed=7).double()
    b = RandomizedMultilinearMap(6, 4, output_dim=32, seed=7).double()
    c = RandomizedMultilinearMap(6, 4, output_dim=32, seed=8).double()
    assert a(f, g).shape == (3, 32)
    assert torch.equal(a(f, g), b(f, g)) and not torch.equal(a(f, g), c(f, g))
    assert "Rf" in a.state_dict() and not list(a.parameters())
    with pytest.raises(ShapeError, match=r"\(3, 5\)"):
        a(torch.randn(3, 5), torch.randn(3, 4))


def test_randomized_map_approximates_the_multilinear_inner_product():
    """Long et al. 2018: E[<T(f, g), T(f', g')>] = <f (x) g, f' (x) g'> = <f, f'> <g, g'> over the random draws.
    Checked over 400 independent maps with a 5-sigma bound from the sample spread; and a single wide map is
    close (the spread shrinks as 1/sqrt(d))."""
    gen = torch.Generator().manual_seed(0)
    f, f2 = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    g, g2 = torch.softmax(torch.randn(2, 4, generator=gen, dtype=torch.float64), 1)
    exact = float(np.outer(f.numpy(), g.numpy()).ravel() @ np.outer(f2.numpy(), g2.numpy()).ravel())
    assert exact == pytest.approx(float(f @ f2) * float(g @ g2), rel=1e-12)
    draws = []
    for seed in range(400):
        m = RandomizedMultilinearMap(6, 4, output_dim=16, seed=seed).double()
        draws.append(float(m(f[None], g[None])[0] @ m(f2[None], g2[None])[0]))
    draws = np.array(draws)
    assert abs(draws.mean() - exact) < 5 * draws.std(ddof=1) / math.sqrt(len(draws))
    wide = RandomizedMultilinearMap(6, 4, output_dim=1 << 16, seed=1).double()
    one = float(wide(f[None], g[None])[0] @ wide(f2[None], g2[None])[0])
    scale = float(f.norm() * f2.norm() * g.norm() * g2.norm())
    assert abs(one - exact) < 0.05 * scale
    # a map of another width or seed is another estimate, not the same numbers
    assert draws.std() > 0


def test_cdan_auto_randomized():
    small = ConditionalDomainAdversarialLoss(DomainDiscriminator(64 * 64), None, num_classes=64, features_dim=64)
    assert not small.randomized and small.map_dim == 4096
    big = ConditionalDomainAdversarialLoss(DomainDiscriminator(1024), None, num_classes=65, features_dim=64)
    assert big.randomized and isinstance(big.map, RandomizedMultilinearMap)
    forced = ConditionalDomainAdversarialLoss(DomainDiscriminator(16), None, 2, 3, randomized=True,
                                              randomized_dim=16)
    assert forced.randomized
    with pytest.raises(ShapeError, match="DomainDiscriminator\\(6\\)"):
        ConditionalDomainAdversarialLoss(DomainDiscriminator(5), None, num_classes=2, features_dim=3)


def _entropy_weights_hand(probs):
    w = [1 + math.exp(sum(p * math.log(p + 1e-5) for p in row)) for row in probs]
    return [v / sum(w) * len(w) for v in w]


@pytest.mark.parametrize("entropy_conditioning", [False, True])
def test_cdan_matches_hand(entropy_conditioning):
    torch.manual_seed(0)
    F_, C = 3, 4
    disc = nn.Linear(F_ * C, 1).double()
    f_s, f_t = torch.randn(3, F_, dtype=torch.float64), torch.randn(2, F_, dtype=torch.float64)
    y_s, y_t = torch.randn(3, C, dtype=torch.float64), torch.randn(2, C, dtype=torch.float64)
    loss = ConditionalDomainAdversarialLoss(disc, GradientReverseLayer(), num_classes=C, features_dim=F_,
                                            entropy_conditioning=entropy_conditioning)
    out = loss(f_s, f_t, y_s, y_t)
    g_s, g_t = torch.softmax(y_s, 1), torch.softmax(y_t, 1)
    h_s = np.stack([np.outer(a, b).ravel() for a, b in zip(f_s.numpy(), g_s.numpy())])
    h_t = np.stack([np.outer(a, b).ravel() for a, b in zip(f_t.numpy(), g_t.numpy())])
    W, b = disc.weight.detach().numpy()[0], disc.bias.item()
    d_s, d_t = (h_s @ W + b).tolist(), (h_t @ W + b).tolist()
    w_s = _entropy_weights_hand(g_s.tolist()) if entropy_conditioning else None
    w_t = _entropy_weights_hand(g_t.tolist()) if entropy_conditioning else None
    assert out["total"].item() == pytest.approx(_bce_hand(d_s, d_t, w_s, w_t), rel=1e-10)


def test_cdan_entropy_weights_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.98, 0.01, 0.01]], dtype=torch.float64)
    w = ConditionalDomainAdversarialLoss.entropy_weights(probs)
    assert w.tolist() == pytest.approx(_entropy_weights_hand(probs.tolist()), rel=1e-12)
    assert w.sum().item() == pytest.approx(3.0)
    assert w[2] > w[0] > w[1]  # confident samples weigh more


def test_cdan_predictions_detached_and_features_reversed():
    torch.manual_seed(0)
    disc = DomainDiscriminator(2 * 3, hidden=8).double()
    f_s = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    y_s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y_t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = ConditionalDomainAdversarialLoss(disc, GradientReverseLayer(), 3, 2, entropy_conditioning=True)
    out = loss(f_s, f_t, y_s, y_t)
    out["total"].backward()
    assert y_s.grad is None and y_t.grad is None
    assert f_s.grad.abs().sum() > 0 and all(p.grad is not None for p in disc.parameters())
    # the feature gradient is the negative of the one without reversal
    rev = f_s.grad.clone()
    f_s.grad = None
    ConditionalDomainAdversarialLoss(disc, nn.Identity(), 3, 2, entropy_conditioning=True)(
        f_s, f_t, y_s, y_t)["total"].backward()
    assert torch.allclose(rev, -f_s.grad)
    with pytest.raises(ShapeError, match="same rows"):
        loss(f_s, f_t, y_s[:3], y_t)
