"""The ``metapl`` command: train, finetune, eval, predict, export, plot, shards (write tar shards), compare (does MPL
pay on my data?) and an offline demo.

Every error a user can fix is printed as one line (``metapl: error: ...``) with exit status 2, never a traceback;
a file-system error that no deeper code named (``OSError``) is reported the same way, naming its path. A training
run stopped by SIGINT/SIGTERM prints how to resume it and exits with 128 + the signal number (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Any, NamedTuple, NoReturn

from metapl.config.fields import FINETUNE_STEPS_IF_NONE, TrainConfig
from metapl.config.flags import add_config_arguments, given_options, resolve
from metapl.config.rules import RUNTIME_KEYS, refuse_resume_flags
from metapl.core.options import specs
from metapl.errors import Interrupted, UserError, describe_os_error
from metapl.logs import console
from metapl.rundir.layout import EXPORT_DIR, RUN_FILES, TENSORBOARD, WANDB

RUN_FOLDERS = (TENSORBOARD, WANDB, EXPORT_DIR)  # the folders among the run files, shown with a slash in --help


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the house's one line (``metapl: error: ...``) that names where to look."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse's signature
        self.exit(2, f"metapl: error: {message}; see {self.prog} --help\n")


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (``COMMANDS``). Builds without importing torch: ``metapl --help`` is fast."""
    parser = _Parser(prog="metapl", description="Meta Pseudo Labels for PyTorch")
    parser.add_argument("--version", action="version", version=f"metapl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def _add_device(p: argparse.ArgumentParser, *, default: str | None = "auto") -> None:
    """``--device`` of the commands that load a trained run: the train option's values; None: the run's device."""
    shown = "the run's" if default is None else default
    p.add_argument("--device", default=default, help=f"{specs(TrainConfig)['device'].help} (default: {shown})")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    runtime = ", ".join("--" + k.replace("_", "-") for k in sorted(RUNTIME_KEYS))
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint with its saved config.yaml; options that alter "
        "the math cannot change. Only --steps N (extend the run to N steps: from the current step on, the learning "
        "rates follow the schedule of an N-step run; a finetuned run is finetuned again) and the runtime options "
        f"({runtime}) may be given with it",
    )
    run_files = ", ".join(f"{name}/" if name in RUN_FOLDERS else name for name in RUN_FILES)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the run in --out even if that folder is not empty: the files of an earlier run there "
        f"({run_files}) are deleted first; other files are left alone. Without it a folder that is not empty is "
        "refused",
    )


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="finetune steps; 0 scores and saves the student as it is (default: the run's finetune_steps, or "
        f"{FINETUNE_STEPS_IF_NONE} when that is 0)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the run's finetune_lr)")
    _add_device(p, default=None)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|CKPT")
    p.add_argument(
        "--data-dir",
        default=None,
        help="where the test data lives (default: the run's); a folder run "
        "scores a train/+test/ tree's test split, and every image of a flat <class>/* folder",
    )
    p.add_argument("--output", default=None, help="JSON file for the results (default: RUN_DIR/eval.json)")
    _add_device(p)
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize --data-dir's images to this size (default: the run's; must be what it trained on)",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="also write each model's confusion matrix as a PNG beside the JSON (<output stem>.confusion.png)",
    )


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|CKPT")
    p.add_argument(
        "--model",
        choices=("finetuned", "ema", "student", "teacher"),
        default=None,
        help="default: a run folder's result (the model the run handed back: summary.json's 'result'); a checkpoint "
        "file's finetuned student if finetuned.pt is beside it, else ema, else student",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("safetensors", "onnx", "torchscript"),
        default="safetensors",
        help="safetensors (the weights; metapl rebuilds the network from the JSON record), onnx (pip install "
        '"metapl[onnx]") or torchscript (a traced graph); each file gets its own JSON record, <file>.json '
        "(default: safetensors)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="the model file (default: RUN_DIR/export/MODEL.<format suffix>); its JSON record goes beside it",
    )


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Classify images as the run's evaluation read them (the training decoder: shorter side resized with bicubic "
        "and centre-cropped, JPEG draft decoding; the run's mean/std) and write one CSV row per image"
    )
    p.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a run folder, a .pt checkpoint of metapl train, or a file of metapl export (.safetensors, .onnx (needs "
        'onnxruntime: pip install "metapl[onnx]") or .torchscript.pt) with its .json record beside it',
    )
    p.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        help="image files (any format Pillow reads, whatever the extension) and folders (searched recursively for "
        "image files, hidden ones skipped)",
    )
    p.add_argument(
        "--model",
        choices=("ema", "student", "teacher", "finetuned"),
        default=None,
        help="the network of a run folder or checkpoint that predicts: ema (the EMA student; the student when the run "
        "kept none), student, teacher, or finetuned (finetuned.pt beside the checkpoint); not with an export, which "
        "holds one network (default: a run folder's result, the model the run handed back; a checkpoint file's EMA "
        "student)",
    )
    p.add_argument(
        "--output",
        default="predictions.csv",
        help="CSV file, columns path, class, probability, top_k (default: predictions.csv)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=3,
        help="how many of the most probable classes the top_k column lists, as class:probability pairs, at most the "
        "number of classes; an integer >= 1 (default: 3)",
    )
    _add_device(p)


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    p.add_argument("--output", default=None, help="PNG file (default: RUN_DIR/curves.png of the first run)")


def _shards_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src_dir", metavar="SRC_DIR", help="train/<class>/* (+ test/<class>/*), or <class>/*")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the .tar shards and classes.json go")
    p.add_argument("--per-shard", type=int, default=1000, help="images per shard (default: 1000)")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave unreadable images out (each named) instead of stopping at the first",
    )


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    from metapl.commands.compare import DEFAULT_OUT, DEFAULT_SEEDS, flag_helps  # torch-free

    p.description = (
        "Train the rows on your recipe (the train options below), seeds paired, the same optimizer-step count for "
        "every final model; compare them on --val-labeled images carved from --num-labeled (default: a fifth); runs "
        f"go to --out/<row>/seed<k>/ (default: {DEFAULT_OUT}), finished ones are skipped, stopped ones resumed; the "
        "table and one recommendation go to compare.md and compare.json there"
    )
    add_config_arguments(p, flag_helps())
    p.add_argument(
        "--seeds", default=DEFAULT_SEEDS, help=f"comma list of seeds, paired across rows (default: {DEFAULT_SEEDS})"
    )


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from metapl.commands.demo import DEMO, ROWS  # torch-free

    p.add_argument("--out", default="runs/demo", help=f"where the {len(ROWS)} runs go (default: runs/demo)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"training steps of each run, at least 1 (default: {DEMO.steps})"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the models and the augmentations (default: 0)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metapl`` console script and ``python -m metapl``."""
    args = get_args_parser().parse_args(argv)
    previous = _terminate_as_exception()
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"metapl: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the last resort: file-writing sites name their path themselves
        print(f"metapl: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; rank 0, which saved, says so once
            print(f"metapl: {e}", file=sys.stderr)
        return e.status
    except (KeyboardInterrupt, _Terminated) as e:
        # Outside the training and finetuning loops (loading data, eval, predict): only the last checkpoint is on disk.
        print("metapl: interrupted; nothing was saved since the last checkpoint", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "torch.distributed" in sys.modules:  # only a command that trained has joined a group
            from metapl.training.process import leave_distributed

            leave_distributed()


class _Terminated(BaseException):
    """SIGTERM outside the loops that stop on it (``metapl.training.process.StopSignals``): ends the command as Ctrl-C
    does, with one line and exit status 143, instead of dying without a word."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise _Terminated


def _terminate_as_exception() -> Callable[[int, FrameType | None], Any] | int | None:
    """Make SIGTERM raise ``_Terminated`` for the command's life; returns the previous handler (None: none was set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


# ----------------------------------------------------------------------------------------------------------------
# What each subcommand runs: the heavy modules (torch, the engine) are imported here, on use.


def _train(args: argparse.Namespace) -> None:
    from metapl.training.trainer import train

    if args.resume:
        train(_resume_config(args), resume=True)
    else:
        train(_resolve(args), overwrite=args.overwrite)


def _finetune(args: argparse.Namespace) -> None:
    from metapl.training.trainer import finetune_run

    finetune_run(args.run_dir, steps=args.steps, lr=args.lr, device=args.device)


def _eval(args: argparse.Namespace) -> None:
    from metapl.commands.inference import run_eval

    run_eval(
        args.path,
        data_dir=args.data_dir,
        output=args.output,
        device=args.device,
        image_size=args.image_size,
        plot=args.plot,
    )


def _export(args: argparse.Namespace) -> None:
    from metapl.commands.export import run_export

    run_export(args.path, model=args.model, fmt=args.fmt, output=args.output)


def _predict(args: argparse.Namespace) -> None:
    from metapl.commands.inference import run_predict

    run_predict(args.checkpoint, args.paths, model=args.model, output=args.output, top_k=args.top_k, device=args.device)


def _plot(args: argparse.Namespace) -> None:
    from metapl.commands.plot import plot_runs

    plot_runs(args.run_dirs, output=args.output)


def _shards(args: argparse.Namespace) -> None:
    from metapl.data.sources.shard_writer import write_shards

    write_shards(args.src_dir, args.out_dir, per_shard=args.per_shard, skip_corrupt=args.skip_corrupt)


def _compare(args: argparse.Namespace) -> None:
    from metapl.commands.compare import compare_command

    compare_command(_resolve(args), given_options(args), seeds=args.seeds)


def _demo(args: argparse.Namespace) -> None:
    from metapl.commands.demo import demo

    demo(out=args.out, steps=args.steps, seed=args.seed)


class Command(NamedTuple):
    """One subcommand: its ``--help`` line, the function that declares its options, the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "train": Command("train a teacher and a student with Meta Pseudo Labels", _train_arguments, _train),
    "finetune": Command("finetune a trained run's student on its labeled data", _finetune_arguments, _finetune),
    "eval": Command(
        "accuracy, per-class figures, confusion matrix and calibration of a run's models", _eval_arguments, _eval
    ),
    "export": Command(
        "write one trained model as .safetensors (+ JSON), ONNX or TorchScript", _export_arguments, _export
    ),
    "predict": Command("classify images or folders of images with a trained model", _predict_arguments, _predict),
    "plot": Command("PNG curves of one or several runs (accuracies, losses, h)", _plot_arguments, _plot),
    "shards": Command(
        "write an image-folder tree as WebDataset-style tar shards (--dataset shards)", _shards_arguments, _shards
    ),
    "compare": Command(
        "does MPL pay on my data? labels only, strong augmentation, FixMatch, h = 0 and MPL (+ distill and Reduced "
        "MPL with --teacher-weights), seeds paired, chosen on validation",
        _compare_arguments,
        _compare,
    ),
    "demo": Command("offline demo: MPL vs a labels-only baseline on scikit-learn's digits", _demo_arguments, _demo),
}


def _dispatch(args: argparse.Namespace) -> int:
    with console():  # the library's lines (metapl.logs) on stdout, rank 0 only
        COMMANDS[args.command].run(args)
    return 0


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    """The saved config of the ``--resume`` run with the runtime options and ``--steps`` of the command line."""
    from metapl.rundir.layout import load_run_config

    given = given_options(args)
    # A resumed run must be the same run: its saved config wins over anything else on the command line.
    refuse_resume_flags(given, overwrite=args.overwrite, config=args.config)
    return replace(load_run_config(args.resume), **given, out=args.resume)


def _version() -> str:
    """The installed distribution's version (``metapl --version``); a source tree on PYTHONPATH says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metapl")
    except PackageNotFoundError:
        return "(not installed: a source checkout)"


def _resolve(args: argparse.Namespace) -> TrainConfig:
    """The train config of the command line; a ``--config`` file that is not text is named in one line."""
    try:
        return resolve(args)
    except UnicodeDecodeError:
        raise UserError(f"config file {args.config} is not UTF-8 text; save it as UTF-8 YAML") from None


if __name__ == "__main__":
    sys.exit(main())
