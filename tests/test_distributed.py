"""Multi-process training on PyTorch's own engine (DDP over gloo, 2 CPU processes).

Core level: 2 ranks that each see half of a batch take the same MPL steps as one process that sees all of it.
CLI level: ``torchrun -m metapl train`` writes one set of outputs and resumes bit-identically.
Soft mode across processes: ``test_distributed_soft.py``; two torchrun agents ("nodes"): ``test_multinode.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import checkpoint_accuracies
from metapl.commands.cli import main
from metapl.config.fields import TrainConfig
from metapl.core import Batch, MPLConfig, MPLState, mpl_update
from metapl.errors import UserError
from metapl.rundir.layout import LATEST
from metapl.training.metrics import read_metrics
from metapl.training.trainer import _refuse_unsupported
from test_train import TINY, _final_params, _train_records

WORLD = 2
K, D = 3, 5  # classes, input features
B, MU = 4, 2  # labeled images per rank, unlabeled per labeled image
STEPS = 3

# (MPLConfig keywords, uda_weight). Argmax labels only: a sampled ŷ draws from each rank's generator.
CASES = {
    "taylor": ({"feedback": "taylor"}, 0.0),
    "dot": ({"feedback": "dot"}, 0.0),
    "taylor-reversed-baseline-uda": (
        {"feedback": "taylor", "feedback_sign": "reversed", "baseline_decay": 0.3, "uda_threshold": 0.3},
        1.0,
    ),
    "dot-strong-clip-smoothing": (
        {"feedback": "dot", "label_view": "strong", "grad_clip": 0.05, "label_smoothing": 0.1},
        0.0,
    ),
}


def _mlp(seed: int, hidden: int, act: type[nn.Module]) -> nn.Module:
    # No BatchNorm: its batch statistics would differ between a half batch and the whole one.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, hidden), act(), nn.Linear(hidden, K)).double()


def _batches() -> list[Batch]:
    """STEPS global batches of 2B labeled and 2μB unlabeled images."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        n_l, n_u = WORLD * B, WORLD * MU * B
        x_uw = torch.randn(n_u, D, generator=g, dtype=torch.float64)
        out.append(
            Batch(
                x_l=torch.randn(n_l, D, generator=g, dtype=torch.float64),
                y_l=torch.randint(0, K, (n_l,), generator=g),
                x_uw=x_uw,
                x_us=x_uw + 0.5 * torch.randn(n_u, D, generator=g, dtype=torch.float64),
            )
        )
    return out


def _shard(batch: Batch, rank: int) -> Batch:
    """Rank ``rank``'s equal share of every tensor of ``batch``."""
    return Batch(*(t.chunk(WORLD)[rank] if t is not None else None for t in batch))


def _train_case(case: str, wrap, rank: int | None) -> dict:
    """STEPS updates of a fresh teacher/student pair; ``rank`` None = the whole batch in this one process."""
    kwargs, uda_weight = CASES[case]
    config = MPLConfig(**kwargs)
    teacher, student = _mlp(1, 7, nn.Tanh), _mlp(2, 6, nn.Softplus)
    teacher, student = wrap(teacher), wrap(student)
    opt = {"lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    t_opt, s_opt = torch.optim.SGD(teacher.parameters(), **opt), torch.optim.SGD(student.parameters(), **opt)
    state, hs = MPLState(), []
    for batch in _batches():
        batch = batch if rank is None else _shard(batch, rank)
        metrics = mpl_update(teacher, student, t_opt, s_opt, batch, config, state, uda_weight=uda_weight)
        hs.append(metrics["mpl/h"])
    named = {f"teacher.{k}": v for k, v in teacher.named_parameters()}
    named.update({f"student.{k}": v for k, v in student.named_parameters()})
    return {"params": {k.replace("module.", ""): v.detach().clone() for k, v in named.items()}, "h": hs}


def _cases_worker(rank: int, train_case, cases: list[str], store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    # A file store: no TCP port to pick, so concurrent test sessions cannot collide.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        for case in cases:
            result = train_case(case, nn.parallel.DistributedDataParallel, rank)
            torch.save(result, Path(out_dir) / f"{case}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_cases(train_case, cases, out: Path) -> Path:
    """``train_case(case, DDP, rank)`` for every case on 2 gloo ranks, in one spawn (starting processes is the slow
    part); each result is saved as ``out/<case>-<rank>.pt``."""
    mp.spawn(_cases_worker, args=(train_case, list(cases), str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def core_results(tmp_path_factory) -> Path:
    """Run every case once on 2 gloo ranks."""
    return spawn_cases(_train_case, CASES, tmp_path_factory.mktemp("ddp-core"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_with_half_batches_match_one_process_with_the_whole_batch(core_results, case):
    ranks = [torch.load(core_results / f"{case}-{r}.pt") for r in range(WORLD)]
    single = _train_case(case, lambda m: m, None)
    # Every rank applied the same updates, bit for bit.
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys() == single["params"].keys()
    for k in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["h"], ranks[1]["h"]))
    # ... and the single-process ones up to float64 rounding: losses are means over equal halves, DDP averages
    # gradients and mpl_update averages h, so each step is the same sum in another order.
    for k, p in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][k], p, rtol=0, atol=1e-10, msg=k)
    torch.testing.assert_close(torch.stack(ranks[0]["h"]), torch.stack(single["h"]))  # metrics are float32
    assert all(h.abs() > 1e-6 for h in single["h"])  # h took part: the check is not vacuous


# --------------------------------------------------------------------------------------------------------------
# torchrun -m metapl train


DDP = [
    *TINY,
    *["--steps", "12", "--save-every", "2", "--deterministic", "--pseudo-label", "sample", "--student-dropout", "0.2"],
    *["--baseline-decay", "0.1"],
]
# Both ranks on the 2 cores (torchrun sets it too); the cache decoded by the first run serves the others.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, script: str | None = None) -> list[str]:
    """The ``torchrun --standalone --nproc_per_node 2`` command line of ``metapl train ARGS``.

    ``script`` runs a file (the ``metapl`` console script) instead of ``-m metapl``. ``python -m
    torch.distributed.run`` is what the ``torchrun`` console script runs; it needs no PATH.
    """
    target = [script] if script else ["-m", "metapl"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    return [*launcher, *target, "train", *args]


def _descendants(pid: int) -> list[int]:
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            out += [child, *_descendants(child)]
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a lost machine would (they run in sessions of their own)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def full_ddp_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (the reference of the resume test)."""
    out = tmp_path_factory.mktemp("ddp-cli") / "full"
    done = subprocess.run(torchrun(*DDP, "--tensorboard", "--out", str(out)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (out.parent / "stdout.txt").write_text(done.stdout)  # what both ranks printed
    return out


def test_torchrun_trains_and_only_rank_zero_writes(full_ddp_run):
    out = full_ddp_run
    names = {p.name for p in out.iterdir()}
    # finetuned.pt: the default recipe finetunes the student (a tenth of the steps), under torchrun too.
    assert names == {
        "config.yaml",
        "split.json",
        LATEST,
        "finetuned.pt",
        "metrics.jsonl",
        "summary.json",
        "tb",
        ".lock",  # rank 0's one-writer lock, released (emptied) at the end
        "train.log",
    }
    assert (out / ".lock").read_text() == ""
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer, not one per rank
    records = read_metrics(out)
    train_steps = [r["step"] for r in records if "train/loss/teacher" in r]
    assert train_steps == list(range(2, 13, 2))  # each step once: only rank 0 appends
    assert [r["step"] for r in records if "eval/ema_acc" in r] == [4, 8, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12
    counted = checkpoint_accuracies(out / LATEST, threads=1)  # rank 0 evaluated with one thread (OMP_NUM_THREADS)
    for key in ("teacher_acc", "student_acc", "ema_acc"):
        assert summary[key] == pytest.approx(counted[key], abs=1e-9), key
    ckpt = torch.load(out / LATEST, weights_only=False)
    assert ckpt["step"] == 12 and len(ckpt["rng_ranks"]) == WORLD
    # Each rank draws its own dropout masks and pseudo labels.
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])


def test_torchrun_shows_each_line_once_and_train_log_holds_them(full_ddp_run):
    shown = (full_ddp_run.parent / "stdout.txt").read_text()
    assert shown.count("labeled images per class") == 1 and shown.count("summary: ") == 1  # rank 0 alone prints
    assert (full_ddp_run / "train.log").read_text() == shown


def test_killed_torchrun_run_resumes_bit_identical(full_ddp_run, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun(*DDP, "--out", str(killed)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # kill once a mid-run checkpoint exists
            if (killed / LATEST).exists() and 2 <= torch.load(killed / LATEST, weights_only=False)["step"] < 12:
                break
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(killed / LATEST, weights_only=False)["step"] < 12

    # Resumed through the console script, which torchrun runs like any Python file.
    script = Path(sys.executable).with_name("metapl")
    cmd = torchrun("--resume", str(killed), script=str(script) if script.exists() else None)
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = _final_params(full_ddp_run), _final_params(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _train_records(full_ddp_run) == _train_records(killed)


def _sigterm_to_torchrun_mid_run(out: Path, log: Path) -> int:
    """Run ``DDP`` under torchrun into ``out`` (its stderr to ``log``) and SIGTERM the agent once a checkpoint exists,
    with every worker paused meanwhile; wait for torchrun to exit. Returns the checkpoint's step seen before."""
    with log.open("w") as err_file:
        proc = subprocess.Popen(
            torchrun(*DDP, "--out", str(out)),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,
        )
        workers: list[int] = []
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and not (out / LATEST).exists():
                time.sleep(0.02)
            workers = _descendants(proc.pid)
            for pid in workers:  # paused at once: the signal surely reaches them mid-run, however loaded the machine
                os.kill(pid, signal.SIGSTOP)
            assert proc.poll() is None and (out / LATEST).exists(), "the run ended before a checkpoint was seen"
            seen = torch.load(out / LATEST, weights_only=False)["step"]
            assert 2 <= seen <= 6
            proc.send_signal(signal.SIGTERM)  # the agent only; it forwards SIGTERM to each worker's process group
            deadline = time.time() + 30
            while time.time() < deadline and log.read_text().count("closing signal SIGTERM") < WORLD:
                time.sleep(0.02)
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            assert proc.wait(timeout=60) == 1  # torchrun's status on a signal: its SignalException is uncaught
        finally:
            _kill_tree(proc)
    return seen


def test_sigterm_to_torchrun_stops_every_rank_at_a_saved_step_and_resumes_bit_identical(full_ddp_run, tmp_path):
    """A scheduler's SIGTERM to the launcher (``torchrun``) only: torchrun sends SIGTERM to each worker's process
    group and waits for them (``--shutdown-timeout``, 30 s by default) before it would SIGKILL them. The ranks agree
    to stop at the next step they synchronise, rank 0 saves that step and prints the one resume line, and torchrun
    exits with status 1 after its own ``SignalException`` traceback (torchrun's, which metapl cannot change)."""
    out, log = tmp_path / "stopped", tmp_path / "torchrun.err"
    seen = _sigterm_to_torchrun_mid_run(out, log)
    err = log.read_text()
    step = torch.load(out / LATEST, weights_only=False)["step"]
    assert seen < step < 12  # stopped mid-run, at a step after the one seen, and saved it
    assert "forcefully exiting" not in err  # every rank stopped by itself within torchrun's shutdown timeout
    lines = [line for line in err.splitlines() if line.startswith("metapl")]
    assert lines == [
        f"metapl: interrupted by SIGTERM at step {step}; saved {out / LATEST}; resume with: metapl train --resume {out}"
    ]
    # The one traceback is the agent's (torchrun's own SignalException); no worker and no metapl frame has one.
    assert err.count("Traceback") == 1 and "/metapl/" not in err, err
    assert err.strip().splitlines()[-1].startswith("torch.distributed.elastic.multiprocessing.api.SignalException")
    assert max(r["step"] for r in read_metrics(out)) <= step

    done = subprocess.run(torchrun("--resume", str(out)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _final_params(full_ddp_run), _final_params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # rank 0's, equal to the unstopped run's
    assert _train_records(full_ddp_run) == _train_records(out)


def test_soft_mode_with_sync_bn_under_a_launcher_is_refused():
    # SyncBatchNorm is a custom autograd Function without a forward-mode (jvp) rule, which soft mode's exact
    # meta-gradient runs the student in. Checked
    # on a CUDA device object: on the CPU, --sync-bn alone is refused first (below).
    with pytest.raises(UserError, match="--sync-bn does not go with --mode soft"):
        _refuse_unsupported(TrainConfig(mode="soft", sync_bn=True), torch.device("cuda"), world_size=2)
    _refuse_unsupported(TrainConfig(mode="soft", sync_bn=True), torch.device("cuda"), world_size=1)  # no DDP: fine
    _refuse_unsupported(TrainConfig(mode="hard", sync_bn=True), torch.device("cuda"), world_size=2)


def test_sync_bn_on_the_cpu_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "2", "--sync-bn", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--sync-bn needs CUDA" in err, err


def test_reduced_mpl_under_torchrun_reads_one_stored_prediction_file(tmp_path):
    # The large teacher predicts once (rank 0 writes the file, rank 1 reads it); both ranks train the reduced teacher
    # and the student on their shares, in soft mode (the hand-made all-reduces) through the rows of stored predictions.
    base = [a for a in TINY if a not in ("--uda-weight", "1")]
    cache = tmp_path / "cache"
    big = tmp_path / "big"
    assert (
        main(["train", *base, "--steps", "8", "--method", "supervised", "--cache-dir", str(cache), "--out", str(big)])
        == 0
    )
    out = tmp_path / "reduced"
    args = [
        *base,
        *["--steps", "6", "--save-every", "3", "--method", "reduced-mpl", "--mode", "soft", "--teacher-weights"],
        str(big),
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
    ]
    done = subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((cache / "predictions").glob("*.npz"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["steps"] == 6
        and summary["large_teacher_acc"] == json.loads((big / "summary.json").read_text())["ema_acc"]
    )
    ckpt = torch.load(out / LATEST, weights_only=False)
    assert len(ckpt["rng_ranks"]) == WORLD and "log_scale" in ckpt["teacher"]
