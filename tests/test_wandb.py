"""``--wandb``: the metrics also go to Weights & Biases, in offline mode here (no network, no login)."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from metapl.commands.cli import main
from metapl.rundir.layout import WANDB, WANDB_ID

TINY = [
    *["--dataset", "digits", "--num-labeled", "20", "--batch-size", "8", "--mu", "2", "--workers", "0"],
    *["--eval-every", "2", "--log-every", "2", "--save-every", "2", "--no-tensorboard", "--no-progress"],
    *["--finetune-steps", "0", "--eval-limit", "50", "--device", "cpu"],
]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B in offline mode, its settings and caches in ``tmp_path``."""
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "metapl-test"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def offline_history(run_file) -> list[dict]:
    """The ``wandb.log`` records of an offline run's ``run-<id>.wandb`` file: a LevelDB-style log (a 7-byte file
    header, then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type) of protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, part, history = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        part, pos = part + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return history


def _train_as_a_process(argv: list[str]) -> int:
    """``metapl ARGV`` and then what the end of its process does: ``wandb.teardown()``, which waits for the W&B service
    (a separate process, shared by every run of this test process) to write out the run's file. Without it the last
    records can still be in flight when the test reads the file (seen about once in eight runs)."""
    import wandb

    code = main(argv)
    wandb.teardown()
    return code


def test_wandb_logs_offline_and_a_resume_continues_the_same_run(tmp_path, offline):
    out = tmp_path / "run"
    assert _train_as_a_process(["train", *TINY, "--steps", "2", "--out", str(out), "--wandb"]) == 0
    run_id = (out / WANDB_ID).read_text().strip()
    [first] = (out / WANDB).glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")
    history = offline_history(first)
    assert any(r.get("train/loss/student") is not None and r["_step"] == 2 for r in history)
    assert any("eval/ema_acc" in r or "eval/student_acc" in r for r in history)

    assert _train_as_a_process(["train", "--resume", str(out), "--steps", "4", "--workers", "0"]) == 0
    assert (out / WANDB_ID).read_text().strip() == run_id
    # two offline runs of one W&B run, which `wandb sync` merges (the second folder's name gets a "-1" suffix when
    # both started within one second)
    runs = sorted((out / WANDB).glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(runs) == 2
    resumed = offline_history(next(r for r in runs if r != first))
    assert [r["_step"] for r in resumed if "train/loss/student" in r] == [4]


def test_wandb_project_alone_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path / "run"), "--wandb-project", "p"]) == 2
    assert "use --wandb\n" in capsys.readouterr().err


def test_missing_wandb_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert err == 'metapl: error: --wandb needs the optional package wandb: pip install "metapl[wandb]"\n'
    assert not out.exists()
