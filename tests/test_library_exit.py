"""A script that calls the trainer and lets its ``Interrupted`` go uncaught still exits: the loop stops its loader
workers however it ends (they ignore SIGTERM, so the interpreter's exit would otherwise wait for them forever)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, threading
    from metapl.config.fields import TrainConfig
    from metapl.training.trainer import train

    cfg = TrainConfig(dataset="digits", num_labeled=50, steps=100_000, batch_size=8, mu=1, workers=1, log_every=1,
                      eval_every=100_000, save_every=100_000, tensorboard=False, progress=False, out=OUT)
    threading.Timer(4.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    train(cfg)  # SIGTERM: saved, then Interrupted, left uncaught
    """
)


def test_an_uncaught_interrupt_in_a_library_script_exits_with_its_workers_stopped(tmp_path):
    script = SCRIPT.replace("OUT", repr(str(tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1 and "metapl.errors.Interrupted: interrupted by SIGTERM at step" in proc.stderr
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
