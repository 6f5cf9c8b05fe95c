"""``mpl_update`` validates what it is handed (``metapl.core.validate``): exact messages for each bad field, a failed
update that leaves both models and optimizers as they were, and a seeded random search over bad batches and values
that never ends in a non-finite weight or an error from inside torch."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import Tensor, nn

from metapl.config.fields import TrainConfig
from metapl.core import Batch, MPLConfig, MPLInputError, MPLState, mpl_update
from metapl.core.validate import check_batch

K = 3


def make_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)

    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, K))

    return make(), make()


def make_batch(n_l: int = 4, n_u: int = 6, **change) -> Batch:
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        torch.randn(n_l, 2, 6, 6, generator=g),
        torch.randint(0, K, (n_l,), generator=g),
        torch.randn(n_u, 2, 6, 6, generator=g),
        torch.randn(n_u, 2, 6, 6, generator=g),
        torch.randint(-1, K, (n_u,), generator=g),
    )
    return batch._replace(**change)


def update(batch, *, mode="hard", s_lr=0.1, t_lr=0.1, uda_weight=1.0, check_finite=True, **config):
    """Run one update; return the error (or None) and whether both models and optimizers are as they were."""
    teacher, student = make_models()
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    # One good update first, so that the optimizers hold momentum buffers to be restored.
    mpl_update(teacher, student, t_opt, s_opt, make_batch(), MPLConfig(mode=mode), MPLState(), uda_weight=1.0)
    t_opt.param_groups[0]["lr"], s_opt.param_groups[0]["lr"] = t_lr, s_lr
    before = copy.deepcopy((teacher.state_dict(), student.state_dict(), t_opt.state_dict(), s_opt.state_dict()))
    error = None
    try:
        mpl_update(
            teacher,
            student,
            t_opt,
            s_opt,
            batch,
            MPLConfig(mode=mode, **config),
            MPLState(),
            uda_weight=uda_weight,
            check_finite=check_finite,
        )
    except MPLInputError as e:
        error = e
    after = (teacher.state_dict(), student.state_dict(), t_opt.state_dict(), s_opt.state_dict())
    return error, _same(before, after), _finite(teacher, student)


def _same(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)  # NaN learning rates compare equal to themselves here


def _finite(*models: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for m in models for t in m.state_dict().values() if t.is_floating_point())


def _nan(shape, at: int = 0) -> Tensor:
    x = torch.randn(shape)
    x.view(-1)[at] = math.nan
    return x


# --------------------------------------------------------------------------------------------------------------
# Each bad field: its message, and both models untouched


BAD = {
    "y_l shorter": (
        dict(y_l=torch.tensor([0, 1, 2])),
        {},
        "batch.y_l has 3 labels but batch.x_l 4 images; pass one label per image",
    ),
    "y_u wrong length": (
        dict(y_u=torch.zeros(2, dtype=torch.long)),
        {},
        "batch.y_u has 2 labels but batch.x_uw 6 images; pass one label per image",
    ),
    "y_l float": (
        dict(y_l=torch.zeros(4)),
        {},
        "batch.y_l has dtype torch.float32; labels must be class indices (torch.long)",
    ),
    "y_l 2-D": (
        dict(y_l=torch.zeros(4, 1, dtype=torch.long)),
        {},
        "batch.y_l has shape (4, 1); expected one class index per image, (N,)",
    ),
    "x_l uint8": (
        dict(x_l=torch.zeros(4, 2, 6, 6, dtype=torch.uint8)),
        {},
        "batch.x_l has dtype torch.uint8; images must be floating point (normalise them)",
    ),
    "x_us 1-D": (
        dict(x_us=torch.zeros(6)),
        {},
        "batch.x_us has shape (6,); expected a leading batch dimension, (N, C, H, W) images or (N, D) vectors",
    ),
    "x_uw empty": (
        dict(x_uw=torch.zeros(0, 2, 6, 6)),
        {},
        "batch.x_uw is empty (0 images); every MPL update needs labeled and unlabeled images",
    ),
    "x_us fewer": (
        dict(x_us=torch.zeros(5, 2, 6, 6)),
        {},
        "batch.x_uw has 6 images but batch.x_us has 5; they must be two views of the same unlabeled images",
    ),
    "sizes differ": (
        dict(x_l=torch.zeros(4, 2, 8, 8)),
        {},
        "batch.x_uw has images of shape (2, 6, 6) but batch.x_l (2, 8, 8); resize labeled and unlabeled "
        "images to one size",
    ),
    "y_l a list": (dict(y_l=[0, 1, 2, 0]), {}, "batch.y_l is a list, not a tensor; pass a torch.Tensor"),
    "uda_weight NaN": (
        {},
        dict(uda_weight=math.nan),
        "uda_weight nan is not a finite number; pass a float >= 0 (0 = no UDA)",
    ),
    "uda_weight negative": ({}, dict(uda_weight=-0.5), "uda_weight -0.5 is negative; pass a float >= 0 (0 = no UDA)"),
    "s_lr NaN": (
        {},
        dict(s_lr=math.nan),
        "s_optimizer.param_groups[0]['lr'] is nan; a learning rate must be a finite number >= 0 (check the schedule)",
    ),
    "t_lr inf": (
        {},
        dict(t_lr=math.inf),
        "t_optimizer.param_groups[0]['lr'] is inf; a learning rate must be a finite number >= 0 (check the schedule)",
    ),
    "y_l = K": (
        dict(y_l=torch.tensor([0, 1, 2, K])),
        {},
        "batch.y_l holds labels outside the models' classes (min 0, max 3); pass class indices in [0, K); "
        "both models were left unchanged",
    ),
    "x_l NaN": (
        dict(x_l=_nan((4, 2, 6, 6))),
        {},
        "batch.x_l holds non-finite values (NaN/inf); both models were left unchanged; drop or fix them",
    ),
    "x_us NaN": (
        dict(x_us=_nan((6, 2, 6, 6), at=7)),
        {},
        "batch.x_us holds non-finite values (NaN/inf); both models were left unchanged; drop or fix them",
    ),
    "3 channels for a 2-channel model": (
        dict(x_l=torch.zeros(4, 3, 6, 6), x_uw=torch.zeros(6, 3, 6, 6), x_us=torch.zeros(6, 3, 6, 6)),
        {},
        "the update failed on this batch (RuntimeError: Given groups=1, weight of size [3, 2, 3, 3], expected input"
        "[...]",
    ),  # the batch size torch names depends on the mode's first forward
}


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_field_is_named_and_both_models_stay_as_they_were(case, mode):
    change, kwargs, message = BAD[case]
    error, same, finite = update(make_batch(**change), mode=mode, **kwargs)
    assert isinstance(error, ValueError)
    assert str(error) == message if not message.endswith("[...]") else str(error).startswith(message[:-5])
    assert same and finite


def test_labels_out_of_range_are_refused_with_every_feedback_estimator():
    for feedback in ("taylor", "dot", "cosine"):
        error, same, _ = update(make_batch(y_l=torch.tensor([-1, 0, 1, 2])), feedback=feedback)
        assert str(error).startswith("batch.y_l holds labels outside the models' classes (min -1, max 2)") and same


def test_a_diverging_step_is_undone_and_check_finite_false_lets_it_through():
    error, same, finite = update(make_batch(x_l=1e30 * torch.ones(4, 2, 6, 6)), feedback="dot")
    assert str(error).startswith("the update produced a non-finite loss or weight; both models and optimizers")
    assert same and finite
    error, same, finite = update(make_batch(x_l=_nan((4, 2, 6, 6))), check_finite=False)
    assert error is None and not same and not finite  # the caller asked for no guard


def test_a_good_batch_passes_and_the_label_flag_is_not_a_metric():
    teacher, student = make_models()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (teacher, student)]
    metrics = mpl_update(teacher, student, *opts, make_batch(), MPLConfig(), MPLState(), uda_weight=1.0)
    assert "check/labels_ok" not in metrics and torch.isfinite(metrics["loss/teacher"])


def test_teacher_input_fields_are_optional_and_checked_by_rows():
    base = make_batch()
    check_batch(base)
    check_batch(base._replace(t_x_l=torch.randn(4, K), t_x_uw=torch.randn(6, K), t_x_us=torch.randn(6, K)))
    with pytest.raises(MPLInputError) as info:
        check_batch(base._replace(t_x_uw=torch.randn(5, K)))
    assert (
        str(info.value) == "batch.t_x_uw has 5 rows but batch.x_uw 6; the teacher's input must describe the same images"
    )
    with pytest.raises(MPLInputError) as info:
        check_batch(base._replace(t_x_l=torch.randn(4, K), t_x_us=torch.randn(6, K + 1)))
    assert (
        str(info.value)
        == "the teacher's inputs differ in shape (t_x_l (3,), t_x_us (4,)); give them one trailing shape"
    )


def test_mpl_state_load_state_dict_names_what_is_missing():
    with pytest.raises(ValueError) as info:
        MPLState().load_state_dict({})
    assert str(info.value) == (
        "MPLState.load_state_dict needs the dict of state_dict() with a 'baseline' entry, got "
        "{}; pass MPLState().state_dict() or a checkpoint's 'mpl_state'"
    )
    state = MPLState()
    state.load_state_dict(MPLState(baseline=torch.tensor(0.5)).state_dict())
    assert state.baseline == 0.5


# --------------------------------------------------------------------------------------------------------------
# A seeded random search: never a non-finite weight, never an error from inside torch


def _random_bad_batch(rng: random.Random) -> tuple[Batch, dict]:
    batch, kwargs = make_batch(), {}
    for _ in range(rng.randint(1, 2)):
        field = rng.choice(["x_l", "y_l", "x_uw", "x_us", "y_u", "uda_weight", "s_lr", "t_lr"])
        if field.startswith("x_"):
            x = getattr(batch, field).clone()
            choice = rng.randrange(6)
            if choice == 0:
                x.view(-1)[rng.randrange(x.numel())] = rng.choice([math.nan, math.inf, -math.inf])
            elif choice == 1:
                x = x[: rng.randint(0, x.shape[0] - 1)]
            elif choice == 2:
                x = x[..., : rng.randint(1, 5)]
            elif choice == 3:
                x = x.to(rng.choice([torch.uint8, torch.int64, torch.float64, torch.float16]))
            elif choice == 4:
                x = x.flatten(1) if rng.random() < 0.5 else x[0]
            else:
                x = x * rng.choice([1e20, 1e38])
            batch = batch._replace(**{field: x})
        elif field.startswith("y_"):
            y = getattr(batch, field)
            choice = rng.randrange(4)
            if choice == 0:
                y = y + rng.choice([K, -5, 100])
            elif choice == 1:
                y = y[1:]
            elif choice == 2:
                y = y.float()
            else:
                y = y[:, None]
            batch = batch._replace(**{field: y})
        else:
            kwargs[field] = rng.choice([math.nan, math.inf, -1.0, 1e30, 0.0])
    return batch, kwargs


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_random_bad_batches_raise_only_mpl_input_errors_and_leave_finite_weights(mode):
    rng = random.Random(20)
    outcomes = {"refused": 0, "trained": 0}
    for _ in range(30):
        batch, kwargs = _random_bad_batch(rng)
        error, same, finite = update(batch, mode=mode, **kwargs)  # any error but MPLInputError fails the test
        assert finite, (batch, kwargs)
        if error is not None:
            assert same, (str(error), kwargs)
        outcomes["refused" if error else "trained"] += 1
    assert outcomes["refused"] >= 20  # the search does reach the checks (a few corruptions are harmless: 1e20 * x)


@pytest.mark.parametrize("seed", range(3))
def test_random_bad_train_config_values_raise_value_errors(seed):
    rng = random.Random(seed)
    names = ["steps", "batch_size", "t_lr", "s_lr", "uda_weight", "mu", "ema", "mode", "feedback", "seed"]
    for _ in range(40):
        name = rng.choice(names)
        value = rng.choice([math.nan, -1, 0, -math.inf, "x", None, 1e400, 2**40, True])
        try:
            TrainConfig(**{name: value})
        except ValueError:
            continue
