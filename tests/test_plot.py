"""``metapl plot``: a readable PNG for one or several runs, and one-line errors for what is not a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from metapl.commands.cli import main
from metapl.commands.plot import load_run_series, make_figure, plot_runs, run_labels, smooth
from metapl.errors import UserError
from metapl.training.metrics import MetricsWriter


def write_metrics(run_dir, *, mpl=True, steps=60, finetuned=False):
    """A metrics.jsonl with the keys the trainer logs (``train/...`` every step, ``eval/...`` every 10)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(run_dir, tensorboard=False)
    rng = np.random.default_rng(0)
    for s in range(1, steps + 1):
        values = {"loss/student": 2.3 * math.exp(-s / 30) + 0.1 * rng.random()}
        if mpl:
            values.update(
                {
                    "loss/teacher": 2.0 * math.exp(-s / 25),
                    "mpl/h": float(rng.normal(0, 0.01)),
                    "mpl/baseline": 1e-3 * math.sin(s),
                }
            )
        writer.write(s, {f"train/{k}": v for k, v in values.items()})
        if s % 10 == 0:
            accs = {"student_acc": 90 - 80 * math.exp(-s / 20), "ema_acc": 91 - 80 * math.exp(-s / 22)}
            if mpl:
                accs["teacher_acc"] = 85 - 80 * math.exp(-s / 25)
            writer.write(s, {f"eval/{k}": v for k, v in accs.items()})
    if finetuned:
        writer.write(steps + 5, {"eval/finetuned_acc": 93.0, "eval/finetuned_top5": 99.0})
    writer.close()


def legend_labels(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def test_two_runs_overlaid_into_a_png(tmp_path, log_lines):
    write_metrics(tmp_path / "mpl", finetuned=True)
    write_metrics(tmp_path / "supervised", mpl=False)
    out = plot_runs([tmp_path / "mpl", tmp_path / "supervised"])
    assert out == tmp_path / "mpl" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    with Image.open(out) as im:
        assert im.width > 1000 and im.height > 700
    assert str(out) in log_lines()[-1]


def test_figure_has_titled_labelled_panels_with_run_names_in_legends(tmp_path):
    write_metrics(tmp_path / "a", finetuned=True)
    write_metrics(tmp_path / "b", mpl=False)
    runs = {name: load_run_series(tmp_path / name) for name in ("a", "b")}
    acc, t_loss, s_loss, h = make_figure(runs).axes
    for ax in (acc, t_loss, s_loss, h):
        assert ax.get_title() and ax.get_xlabel() == "step" and ax.get_ylabel()
        assert ax.xaxis.get_gridlines()[0].get_visible() and ax.yaxis.get_gridlines()[0].get_visible()
    assert set(legend_labels(acc)) == {
        "a: teacher",
        "a: student",
        "a: EMA student",
        "a: finetuned student",
        "b: student",
        "b: EMA student",
    }
    assert [label.split(" ")[0] for label in legend_labels(s_loss)] == ["a", "b"]
    assert legend_labels(t_loss) == ["a (smoothed)"]  # 60 points: smoothed on top of the faint raw curve
    assert legend_labels(h) == ["a: h (smoothed)", "a: baseline (moving avg)"]


def test_panels_without_data_say_why(tmp_path):
    write_metrics(tmp_path / "sup", mpl=False, steps=5)  # no teacher, no h, no evaluation yet
    _, t_loss, s_loss, h = make_figure({"sup": load_run_series(tmp_path / "sup")}).axes
    assert legend_labels(t_loss) == [] and "no teacher" in t_loss.texts[0].get_text()
    assert "no MPL feedback" in h.texts[0].get_text()
    assert legend_labels(s_loss) == ["sup"]  # 5 points: drawn as is, not smoothed


def test_explicit_output_and_cli(tmp_path):
    write_metrics(tmp_path / "run")
    out = tmp_path / "figs" / "c.png"
    assert main(["plot", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert out.stat().st_size > 0
    with pytest.raises(UserError, match="xyz"):
        plot_runs([tmp_path / "run"], output=tmp_path / "c.xyz")


def test_missing_dir_and_run_without_metrics_are_user_errors(tmp_path):
    write_metrics(tmp_path / "ok")
    with pytest.raises(UserError, match="not found") as err:
        plot_runs([tmp_path / "ok", tmp_path / "missing"])
    assert "missing" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_runs([tmp_path / "empty"])
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        plot_runs([tmp_path / "empty"])
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "ok" / "curves.png").exists()


def test_series_are_sorted_and_skip_missing_values(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 2, "train/loss/student": 1.0}\n{"step": 1, "train/loss/student": 2.0}\n'
        '{"step": 3, "train/loss/student": null}\n{"step": 4, "train/loss/st'  # a line torn by a kill
    )
    steps, values = load_run_series(run)["train/loss/student"]
    assert steps.tolist() == [1, 2] and values.tolist() == [2.0, 1.0]


def test_run_labels_disambiguate_equal_names(tmp_path):
    assert run_labels([tmp_path / "mpl", tmp_path / "base"]) == ["mpl", "base"]
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]


def test_smooth_is_centred_and_keeps_the_ends():
    np.testing.assert_allclose(smooth(np.full(6, 3.0), 3), np.full(6, 3.0))  # a constant stays constant, ends too
    line = np.arange(10.0)
    np.testing.assert_allclose(smooth(line, 5)[2:-2], line[2:-2])  # no lag on a straight line
    np.testing.assert_allclose(smooth(np.array([0.0, 3.0, 0.0, 3.0]), 3), [1.5, 1.0, 2.0, 1.5])
    np.testing.assert_allclose(smooth(line, 1), line)
