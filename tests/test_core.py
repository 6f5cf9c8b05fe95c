"""Correctness of the MPL core on tiny float64 models: gradients, h, signs, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metapl.core import Batch, MPLConfig, MPLState, feedback_mode, mpl_update

K = 3  # classes
D = 5  # input features


def make_mlp(seed: int, hidden: int = 7, act: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(D, hidden, bias=False), nn.BatchNorm1d(hidden), act()]  # no bias before BN
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, K))
    return nn.Sequential(*layers).double()


def make_batch(seed: int, n_l: int = 8, n_u: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(n_l, D, generator=g, dtype=torch.float64)
    y_l = torch.randint(0, K, (n_l,), generator=g)
    x_uw = torch.randn(n_u, D, generator=g, dtype=torch.float64)
    x_us = x_uw + 0.3 * torch.randn(n_u, D, generator=g, dtype=torch.float64)
    y_u = torch.randint(0, K, (n_u,), generator=g)
    return Batch(x_l, y_l, x_uw, x_us, y_u)


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def run(teacher, student, batch, config, *, t_lr=0.1, s_lr=0.1, state=None, uda_weight=0.0):
    return mpl_update(
        teacher, student, sgd(teacher, t_lr), sgd(student, s_lr), batch, config, state, uda_weight=uda_weight
    )


# --------------------------------------------------------------------------------------------------------------
# Soft mode: the exact meta-gradient


def test_soft_teacher_gradient_matches_finite_differences():
    teacher, student = make_mlp(0), make_mlp(1, hidden=6, act=nn.Tanh)
    batch = make_batch(2)
    eta = 0.5
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    # Teacher lr 0: the update leaves θ_T in place, and .grad holds the gradient the teacher applied.
    run(teacher, student, batch, MPLConfig(mode="soft"), t_lr=0.0, s_lr=eta)
    grad = torch.cat([p.grad.flatten() for p in teacher.parameters()])

    # The objective written out independently: the teacher's labeled CE over the same joint forward plus the
    # labeled loss of the student after one plain SGD step on the teacher's soft labels (BatchNorm on batch stats).
    names = [n for n, _ in t0.named_parameters()]
    s_names = [n for n, _ in s0.named_parameters()]

    def objective(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, p in t0.named_parameters():
            params[n] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        t_logits = torch.func.functional_call(t0, params, (torch.cat([batch.x_l, batch.x_uw]),))
        n_l = batch.x_l.shape[0]
        t_loss_l = F.cross_entropy(t_logits[:n_l], batch.y_l)
        q = F.softmax(t_logits[n_l:], dim=-1)
        s_params = dict(s0.named_parameters())
        s_logits = torch.func.functional_call(s0, s_params, (batch.x_us,))
        s_loss = -(q * F.log_softmax(s_logits, -1)).sum(-1).mean()
        g = torch.autograd.grad(s_loss, list(s_params.values()), create_graph=True)
        new = {n: s_params[n] - eta * gi for n, gi in zip(s_names, g)}
        l_new = F.cross_entropy(torch.func.functional_call(s0, new, (batch.x_l,)), batch.y_l)
        return t_loss_l + l_new

    assert len(names) == len(list(teacher.parameters()))
    flat0 = torch.cat([p.detach().flatten() for p in t0.parameters()])
    eps = 1e-6
    fd = torch.zeros_like(flat0)
    for i in range(flat0.numel()):
        e = torch.zeros_like(flat0)
        e[i] = eps
        fd[i] = (objective(flat0 + e) - objective(flat0 - e)) / (2 * eps)
    rel = (grad - fd).norm() / fd.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"
    # The meta term is not negligible here, so the test would catch a missing or wrong second-order part.
    t_only = torch.autograd.grad(
        F.cross_entropy(t0(torch.cat([batch.x_l, batch.x_uw]))[: batch.x_l.shape[0]], batch.y_l),
        list(t0.parameters()),
    )
    assert (grad - torch.cat([g.flatten() for g in t_only])).norm() > 100 * (grad - fd).norm()


def reference_soft_double_backward(teacher, student, batch, eta):
    """The soft update as metapl computed it before the forward-mode JVP, in one process, ``MPLConfig(mode="soft")``:
    the student's gradient g with ``create_graph=True``, L_l(θ_S − η g) backpropagated into θ_T through g (a double
    backward), then a plain SGD step of the student on g. Dropout draws in the update's order: teacher, then student.

    Returns:
        ``(teacher gradient, L_l(θ'_S))``; ``student`` has taken its step, its running statistics advanced once.
    """
    n_l = batch.x_l.shape[0]
    t_logits = teacher(torch.cat([batch.x_l, batch.x_uw]))
    q = F.softmax(t_logits[n_l:], dim=-1)
    s_params = dict(student.named_parameters())
    s_logits = torch.func.functional_call(student, s_params, (batch.x_us,))  # the module's buffers advance here
    g = torch.autograd.grad(
        -(q * F.log_softmax(s_logits, -1)).sum(-1).mean(), list(s_params.values()), create_graph=True
    )
    new = {n: p.detach() - eta * gi for (n, p), gi in zip(s_params.items(), g)}
    with feedback_mode(student):
        s_loss_l_new = F.cross_entropy(torch.func.functional_call(student, new, (batch.x_l,)), batch.y_l)
    t_grad = torch.autograd.grad(F.cross_entropy(t_logits[:n_l], batch.y_l) + s_loss_l_new, list(teacher.parameters()))
    with torch.no_grad():
        for p, gi in zip(student.parameters(), g):
            p -= eta * gi
    return t_grad, s_loss_l_new.detach()


def test_soft_jvp_gradient_equals_the_double_backward_one_with_batchnorm_and_dropout():
    teacher, student = make_mlp(0, dropout=0.2), make_mlp(1, hidden=6, act=nn.Tanh, dropout=0.3)
    batch, eta = make_batch(3), 0.5
    t_ref, s_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    torch.manual_seed(5)
    metrics = run(teacher, student, batch, MPLConfig(mode="soft"), t_lr=0.0, s_lr=eta)
    rng_after = torch.get_rng_state()
    torch.manual_seed(5)
    grad_ref, s_loss_l_new_ref = reference_soft_double_backward(t_ref, s_ref, batch, eta)
    for (name, p), g_ref in zip(teacher.named_parameters(), grad_ref):  # the JVP forward drew the same masks
        torch.testing.assert_close(p.grad, g_ref, rtol=0, atol=1e-12, msg=name)
    # Same draws consumed: the JVP forward replays the student's dropout masks and leaves the generator as it was.
    assert torch.equal(rng_after, torch.get_rng_state())
    assert metrics["loss/teacher_mpl"] == s_loss_l_new_ref.float()
    # The student's step and its BatchNorm running statistics (advanced once, not twice) are the old path's.
    for (name, a), b in zip(student.state_dict().items(), s_ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=name)
    assert student[2].num_batches_tracked == 1


# --------------------------------------------------------------------------------------------------------------
# Hard mode: h


def reference_dot_h(teacher, student, batch, eta, cosine=False):
    """η ⟨∇L_l(θ'_S), ∇CE(ŷ, S(x_us; θ_S))⟩ with plain autograd on copies (train-mode BN, no dropout); with
    ``cosine``, the cosine similarity of the same two gradients instead."""
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    with torch.no_grad():
        y_hat = t(batch.x_uw).argmax(-1)
    g_us = torch.autograd.grad(F.cross_entropy(s(batch.x_us), y_hat), list(s.parameters()))
    with torch.no_grad():
        for p, g in zip(s.parameters(), g_us):
            p -= eta * g
    g_l = torch.autograd.grad(F.cross_entropy(s(batch.x_l), batch.y_l), list(s.parameters()))
    if cosine:
        return F.cosine_similarity(torch.cat([g.flatten() for g in g_l]), torch.cat([g.flatten() for g in g_us]), 0)
    return eta * sum((a * b).sum() for a, b in zip(g_l, g_us))


def test_hard_dot_h_equals_gradient_dot_product():
    teacher, student = make_mlp(0), make_mlp(1, hidden=9)
    batch = make_batch(3)
    eta = 0.3
    expected = reference_dot_h(teacher, student, batch, eta)
    metrics = run(teacher, student, batch, MPLConfig(feedback="dot"), s_lr=eta)
    assert torch.allclose(metrics["mpl/h"].double(), expected, rtol=1e-5, atol=1e-12)
    assert expected.abs() > 1e-6


def test_hard_cosine_h_is_the_gradients_cosine_and_free_of_eta():
    teacher, student = make_mlp(0), make_mlp(1, hidden=9)
    batch = make_batch(3)
    for eta in (0.3, 0.003):
        expected = reference_dot_h(teacher, student, batch, eta, cosine=True)
        h = run(copy.deepcopy(teacher), copy.deepcopy(student), batch, MPLConfig(feedback="cosine"), s_lr=eta)["mpl/h"]
        assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-9)
        assert 0.01 < expected.abs() <= 1.0  # the raw dot form is ~eta * |g|^2; the cosine is not scaled by eta
    dot = run(copy.deepcopy(teacher), copy.deepcopy(student), batch, MPLConfig(feedback="dot"), s_lr=0.003)["mpl/h"]
    assert torch.sign(dot) == torch.sign(h)


def test_taylor_agrees_with_dot_to_first_order():
    teacher, student = make_mlp(0), make_mlp(1)
    batch = make_batch(4)
    rel = []
    for eta in (1e-1, 1e-2, 1e-3):
        h = {}
        for fb in ("taylor", "dot"):
            t, s = copy.deepcopy(teacher), copy.deepcopy(student)
            h[fb] = run(t, s, batch, MPLConfig(feedback=fb), s_lr=eta)["mpl/h"].double()
        rel.append(((h["taylor"] - h["dot"]).abs() / h["dot"].abs()).item())
    assert rel[0] > rel[1] > rel[2], rel
    assert rel[2] < 1e-2, rel


def pretrained_teacher_and_easy_batch():
    """A teacher that labels the unlabeled images like the labeled ones, so the student's step helps."""
    batch = make_batch(5, n_l=16, n_u=16)
    batch = Batch(batch.x_l, batch.y_l, batch.x_l.clone(), batch.x_l.clone(), batch.y_l.clone())
    teacher = make_mlp(0)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.5)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(teacher(batch.x_l), batch.y_l).backward()
        opt.step()
    return teacher, make_mlp(1), batch


@pytest.mark.parametrize("feedback", ["taylor", "dot"])
def test_sign_derived_reinforces_helpful_labels_and_reversed_suppresses_them(feedback):
    teacher, student, batch = pretrained_teacher_and_easy_batch()
    probs = {}
    for name, cfg in {
        "off": MPLConfig(feedback=feedback, mpl_weight=0.0),
        "derived": MPLConfig(feedback=feedback, feedback_sign="derived"),
        "reversed": MPLConfig(feedback=feedback, feedback_sign="reversed"),
    }.items():
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        with torch.no_grad():
            y_hat = t(batch.x_uw).argmax(-1)
        metrics = run(t, s, batch, cfg, t_lr=0.05, s_lr=0.5)
        with torch.no_grad(), feedback_mode(t):
            probs[name] = F.softmax(t(batch.x_us), -1).gather(1, y_hat[:, None]).mean()
        if name == "derived":
            assert metrics["mpl/h"] > 0, "the student's step on correct labels should lower its labeled loss"
        if name == "reversed":
            assert metrics["mpl/h"] < 0
    assert probs["derived"] > probs["off"] > probs["reversed"], probs


# --------------------------------------------------------------------------------------------------------------
# Every mode: gradients, changes, determinism, bookkeeping


@pytest.mark.parametrize(
    "config",
    [
        MPLConfig(feedback="taylor"),
        MPLConfig(feedback="dot"),
        MPLConfig(mode="soft"),
        MPLConfig(label_view="strong", pseudo_label="sample"),
        MPLConfig(mode="soft", label_view="strong"),
        MPLConfig(feedback="cosine"),
        MPLConfig(teacher_batch="joint"),
    ],
    ids=["taylor", "dot", "soft", "strong-sample", "soft-strong", "cosine", "joint"],
)
def test_every_parameter_gets_a_gradient_and_changes(config):
    teacher, student = make_mlp(0, dropout=0.2), make_mlp(1, hidden=4, dropout=0.1)
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    metrics = run(teacher, student, make_batch(6), config, uda_weight=1.0)
    for before, model in ((t0, teacher), (s0, student)):
        for (name, p0), p in zip(before.named_parameters(), model.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(p0, p), name
    assert all(torch.isfinite(v) for k, v in metrics.items() if k != "pseudo/acc")
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_same_seed_is_bit_identical(mode):
    def once():
        teacher, student = make_mlp(0, dropout=0.3), make_mlp(1, dropout=0.3)
        torch.manual_seed(123)
        metrics = [run(teacher, student, make_batch(i), MPLConfig(mode=mode), uda_weight=0.5) for i in range(3)]
        return [p.clone() for p in [*teacher.parameters(), *student.parameters()]], metrics

    (p1, m1), (p2, m2) = once(), once()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    for a, b in zip(m1, m2):
        assert all(torch.equal(a[k], b[k]) or (a[k].isnan() and b[k].isnan()) for k in a)


def test_student_waiting_with_lr_zero_skips_student_and_gives_zero_h():
    teacher, student = make_mlp(0), make_mlp(1)
    s0 = copy.deepcopy(student)
    metrics = run(teacher, student, make_batch(7), MPLConfig(), s_lr=0.0)
    assert metrics["mpl/h"] == 0 and metrics["loss/student"] == 0
    assert all(torch.equal(a, b) for a, b in zip(s0.state_dict().values(), student.state_dict().values()))


def test_feedback_mode_is_deterministic_and_leaves_running_stats_alone():
    model = make_mlp(0, dropout=0.5)
    x = torch.randn(8, D, dtype=torch.float64)
    bn = model[2]
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    with feedback_mode(model):
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])
    assert model.training and all(m.training for m in model.modules())
    # BatchNorm inside used the batch's statistics, not the (untrained) running ones.
    model.eval()
    assert not torch.allclose(model(x), a)


def test_moving_average_baseline_follows_h():
    teacher, student = make_mlp(0), make_mlp(1)
    state = MPLState()
    cfg = MPLConfig(baseline_decay=0.25)
    hs = []
    for i in range(3):
        m = run(teacher, student, make_batch(10 + i), cfg, state=state)
        hs.append(m["mpl/h"])
    expected = torch.zeros(())
    for h in hs:
        expected = expected + 0.25 * (h - expected)
    assert torch.allclose(state.baseline.float(), expected, atol=1e-7)
    with pytest.raises(ValueError, match="MPLState"):
        run(teacher, student, make_batch(1), cfg, state=None)


def test_pseudo_label_accuracy_ignores_unknown_labels():
    teacher, student = make_mlp(0), make_mlp(1)
    batch = make_batch(8)
    with torch.no_grad():
        y_hat = teacher(batch.x_uw).argmax(-1)
    y_u = y_hat.clone()
    y_u[:4] = (y_hat[:4] + 1) % K  # 4 wrong
    y_u[4:8] = -1  # 4 unknown
    # split: the weak view's own teacher forward, which y_hat above reproduces (joint normalises it with x_l, x_us)
    metrics = run(teacher, student, batch._replace(y_u=y_u), MPLConfig(teacher_batch="split"))
    assert metrics["pseudo/acc"] == pytest.approx((16 - 8) / 12)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="feedback"):
        MPLConfig(feedback="exact")
    with pytest.raises(ValueError, match="mode"):
        MPLConfig(mode="medium")


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_bfloat16_autocast_runs_on_cpu(mode):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(K))
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(K))
    x = torch.randn(4, 3, 6, 6)
    teacher(x), student(x)  # materialise the lazy layers
    batch = Batch(x, torch.tensor([0, 1, 2, 0]), torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6))
    metrics = mpl_update(
        teacher, student, sgd(teacher, 0.1), sgd(student, 0.1), batch, MPLConfig(mode=mode), amp_dtype=torch.bfloat16
    )
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_student_view_weak_trains_the_student_on_the_weak_view(mode):
    """student_view="weak": the student's step is the one it would take if the strong view were the weak one."""
    base = make_batch(0)
    weak_twice = Batch(base.x_l, base.y_l, base.x_uw, base.x_uw.clone(), base.y_u)

    def student_after(batch, view):
        teacher, student = make_mlp(0), make_mlp(1)
        # No UDA and a split teacher forward in hard mode: the teacher never sees x_us.
        split = {"teacher_batch": "split"} if mode == "hard" else {}
        run(teacher, student, batch, MPLConfig(mode=mode, student_view=view, **split))
        return [p.detach().clone() for p in student.parameters()]

    on_weak = student_after(base, "weak")
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(on_weak, student_after(weak_twice, "strong")))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(on_weak, student_after(base, "strong")))
