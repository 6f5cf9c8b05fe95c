"""Where metapl's lines go (``metapl.logs``): the console of the ``metapl`` command, rank 0 only, ``train.log``, and
nothing at all for a library user who configured no logging."""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import pytest

from metapl.logs import RunLog, console, process_rank, quiet, run_log
from test_train import TINY

log = logging.getLogger("metapl.test")


def test_console_prints_each_line_alone_on_stdout_and_a_warning_as_such(capsys):
    with console():
        log.info("data: 3 images")
        log.warning("a folder was skipped")
        log.debug("not shown")
    assert capsys.readouterr() == ("data: 3 images\nwarning: a folder was skipped\n", "")
    log.info("after the block")
    assert capsys.readouterr() == ("", "")


def test_console_prints_on_rank_zero_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with console():
        log.info("rank 1 says nothing")
        log.warning("not even a warning")
    monkeypatch.setenv("RANK", "0")
    with console():
        log.info("rank 0 speaks")
    assert capsys.readouterr().out == "rank 0 speaks\n"


def test_the_rank_of_an_initialised_group_wins_over_the_environment(monkeypatch):
    # torchrun sets RANK; a group started otherwise (mp.spawn, a cluster's launcher) has only its own rank.
    group = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: 1)
    monkeypatch.setitem(sys.modules, "torch.distributed", group)
    monkeypatch.setenv("RANK", "0")
    assert process_rank() == 1
    group.is_initialized = lambda: False
    assert process_rank() == 0


def test_quiet_silences_the_console_but_not_train_log(tmp_path, capsys):
    with console(), run_log() as lines:
        log.info("before the folder exists")
        lines.open(tmp_path / "train.log")
        with quiet():
            log.info("only in the file")
            log.warning("this too")
        log.info("both again")
    assert capsys.readouterr().out == "before the folder exists\nboth again\n"
    assert (tmp_path / "train.log").read_text() == (
        "before the folder exists\nonly in the file\nwarning: this too\nboth again\n"
    )


def test_run_log_holds_lines_until_opened_appends_and_detaches(tmp_path, monkeypatch):
    path = tmp_path / "train.log"
    path.write_text("an earlier run\n")
    with run_log() as lines:
        assert isinstance(lines, RunLog)
        log.info("held")
        assert path.read_text() == "an earlier run\n"
        lines.open(path)
        assert path.read_text() == "an earlier run\nheld\n"  # flushed at once: the file holds what a kill leaves
        log.info("appended")
        monkeypatch.setenv("RANK", "1")
        log.info("another rank's line")
        monkeypatch.setenv("RANK", "0")
    log.info("after the run")
    assert path.read_text() == "an earlier run\nheld\nappended\n"
    assert not any(isinstance(h, RunLog) for h in logging.getLogger("metapl").handlers)


def test_a_library_train_prints_nothing_and_still_writes_train_log(tmp_path, capsys):
    from metapl.commands.cli import get_args_parser
    from metapl.config.flags import resolve
    from metapl.training.trainer import train

    args = get_args_parser().parse_args(["train", *TINY, "--steps", "2", "--out", str(tmp_path / "run")])
    train(resolve(args))
    assert capsys.readouterr() == ("", "")
    written = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert written[0].startswith("cpu: ") and written[-1].startswith("summary: ")


SCRIPT = """
import json, logging, sys
from pathlib import Path
from metapl.config.fields import TrainConfig
from metapl.data import load_dataset, make_split
from metapl.logs import console
from metapl.rundir.layout import save_config
from metapl.rundir.result import read_result

if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stdout)
run = Path(sys.argv[2])
save_config(TrainConfig(), run / "config.yaml")
(run / "summary.json").write_text(json.dumps({}))

def work():
    data = load_dataset("digits", None)  # its summary line
    make_split(data.train.labels, 21, 10, seed=0)  # two lines, one about the leftover label
    read_result(run)  # a warning: the run has not finished

if sys.argv[1] == "console":
    with console():
        work()
else:
    work()
print("done")
"""


@pytest.mark.parametrize("setup", ["bare", "configured", "console"])
def test_as_a_library_metapl_prints_only_what_its_user_asked_for(tmp_path, setup):
    done = subprocess.run([sys.executable, "-c", SCRIPT, setup, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    if setup == "bare":  # no handler configured: not a line, not even the warning
        assert lines == ["done"]
    elif setup == "configured":  # the user's own format, from the modules' loggers
        assert lines[0] == "metapl.data.sources.load INFO digits: 1297 train / 500 test images, 8x8x1, 10 classes"
        assert lines[-2].startswith(f"metapl.rundir.result WARNING {tmp_path} has not finished")
    else:  # console(): the lines the metapl command shows
        assert lines[0] == "digits: 1297 train / 500 test images, 8x8x1, 10 classes"
        assert lines[1].startswith("21 labels do not divide by 10 classes")
        assert lines[-2].startswith(f"warning: {tmp_path} has not finished") and len(lines) == 5
