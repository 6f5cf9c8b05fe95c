"""Two torchrun agents on this machine, as two nodes of one job: c10d rendezvous, gloo, one process per node.

Each "node" has its own run folder (as separate machines have separate disks): only global rank 0 writes one.
``train_and_dump.py`` saves every rank's final parameters, so the test can check that both nodes hold the same model.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from metapl.rundir.layout import LATEST
from test_distributed import ENV
from test_train import TINY

NODES = 2
# Soft mode averages the student's gradients by hand (no DDP forward), and dropout draws per-rank masks: the
# replicas stay identical only if every cross-rank average is right.
ARGS = [*TINY, "--steps", "4", "--mode", "soft", "--student-dropout", "0.2", "--finetune-steps", "2"]


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released for the rendezvous store to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def node_command(port: int, run_id: str, dump_dir: Path, out: Path) -> list[str]:
    """The command one node runs: torchrun with c10d rendezvous at ``localhost:port``, one process."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(NODES),
        *["--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint"],
        f"localhost:{port}",
        "--rdzv_id",
        run_id,
    ]
    script = Path(__file__).with_name("train_and_dump.py")
    return [*launcher, str(script), str(dump_dir), *ARGS, "--out", str(out)]


def test_two_torchrun_nodes_train_one_model(tmp_path):
    port, run_id = free_port(), f"metapl-test-{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / f"node{n}" / "run" for n in range(NODES)]
    procs = [
        subprocess.Popen(
            node_command(port, run_id, tmp_path / "dumps", out),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]

    # Exactly one node holds the run: the one whose process got global rank 0 (the rendezvous decides which).
    written = [out for out in outs if out.exists()]
    assert len(written) == 1 and (written[0] / LATEST).is_file()
    ranks = [torch.load(tmp_path / "dumps" / f"rank{r}.pt") for r in range(NODES)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    for role in ("teacher", "student", "ema"):
        a, b = ranks[0][role], ranks[1][role]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), role  # both nodes hold the same model, bit for bit
    # ... and they are the run's: the teacher (not finetuned afterwards) is the one rank 0 checkpointed.
    ckpt = torch.load(written[0] / LATEST, weights_only=False)
    assert all(torch.equal(ckpt["teacher"][k], p) for k, p in ranks[0]["teacher"].items())
