"""Soft mode (the exact meta-gradient) across processes: 2 gloo ranks match one process on the whole batch.

The models have no BatchNorm, so no batch statistics couple the images: the only cross-rank terms are the ones the
soft update all-reduces (the student's gradient ḡ and the labeled gradient v at θ'_S, see ``core.soft._look_ahead``)
and the teacher's gradient that its DDP wrapper averages.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from metapl.core import MPLConfig, mpl_update
from metapl.rundir.layout import LATEST
from test_distributed import ENV, WORLD, _batches, _mlp, _shard, spawn_cases, torchrun
from test_train import TINY

# (MPLConfig keywords, uda_weight)
CASES = {
    "soft": ({"mode": "soft"}, 0.0),
    "soft-uda-clip-smoothing-temperature": (
        {"mode": "soft", "uda_threshold": 0.3, "grad_clip": 0.05, "label_smoothing": 0.1, "soft_temperature": 2.0},
        1.0,
    ),
    "soft-strong-reversed-weight": (
        {"mode": "soft", "label_view": "strong", "feedback_sign": "reversed", "mpl_weight": 3.0},
        0.5,
    ),
}


def _train_case(case: str, wrap, rank: int | None) -> dict[str, torch.Tensor]:
    """Three soft updates of a fresh pair; ``rank`` None = the whole batch in this one process.

    Returns:
        The teacher's and the student's parameters by name (without DDP's ``module.`` prefix).
    """
    kwargs, uda_weight = CASES[case]
    config = MPLConfig(**kwargs)
    teacher, student = wrap(_mlp(1, 7, nn.Tanh)), wrap(_mlp(2, 6, nn.Softplus))
    opt = {"lr": 0.3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    t_opt, s_opt = torch.optim.SGD(teacher.parameters(), **opt), torch.optim.SGD(student.parameters(), **opt)
    for batch in _batches():
        batch = batch if rank is None else _shard(batch, rank)
        mpl_update(teacher, student, t_opt, s_opt, batch, config, uda_weight=uda_weight)
    named = {f"teacher.{k}": v for k, v in teacher.named_parameters()}
    named.update({f"student.{k}": v for k, v in student.named_parameters()})
    return {k.replace("module.", ""): v.detach().clone() for k, v in named.items()}


@pytest.fixture(scope="module")
def soft_results(tmp_path_factory) -> Path:
    """Every case once on 2 gloo ranks (one spawn for all cases)."""
    return spawn_cases(_train_case, CASES, tmp_path_factory.mktemp("ddp-soft"))


@pytest.mark.parametrize("case", list(CASES))
def test_soft_two_ranks_with_half_batches_match_one_process_with_the_whole_batch(soft_results, case):
    ranks = [torch.load(soft_results / f"{case}-{r}.pt") for r in range(WORLD)]
    single = _train_case(case, lambda m: m, None)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank took the same steps, bit for bit
        torch.testing.assert_close(ranks[0][k], single[k], rtol=0, atol=1e-10, msg=k)


def test_torchrun_trains_in_soft_mode(tmp_path):
    out = tmp_path / "soft"
    done = subprocess.run(
        torchrun(*TINY, "--steps", "4", "--mode", "soft", "--out", str(out)), env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(out / LATEST, weights_only=False)
    assert ckpt["step"] == 4 and ckpt["config"]["mode"] == "soft" and len(ckpt["rng_ranks"]) == WORLD
