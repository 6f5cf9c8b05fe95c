"""Smoke tests of the benchmarks package (``python -m benchmarks.NAME`` from the repository root): the step-speed
benchmark end to end at its tiny size and its operator profile, the loader benchmark and the accuracy tables (2-step
runs, on the real data in ../shared/data; skipped where it is absent), the harness's resumable runs, and the GPU
check's pieces that need no GPU (its TINY mode runs the trainer too and takes over 30 s on 2 busy cores, so it is
checked by its parts here and by hand with ``TINY=1 python -m benchmarks.gpu_check``)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metapl.engine.config import TrainConfig, shipped_configs

REPO = Path(__file__).resolve().parents[1]
VARIANT_ROWS = {
    "hard-taylor",
    "hard-dot",
    "soft",
    "ideal-taylor",
    "ideal-dot",
    "distill",
    "reduced-taylor",
    "reduced-dot",
    "reduced-cosine",
}


def _load(name: str):
    """The module ``benchmarks.NAME``."""
    return importlib.import_module(f"benchmarks.{name}")


def _bench(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m benchmarks.NAME ARGS`` from the repository root, as the report documents it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def step_speed():
    return _load("step_speed")


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``step_speed --tiny`` run over every variant, as a subprocess (the CPU path forks per variant)."""
    out = tmp_path_factory.mktemp("step_speed") / "out.json"
    res = _bench("step_speed", "--tiny", "--models", "small_cnn", "--threads", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())


def test_step_speed_tiny_prints_a_table_per_model_and_shape(tiny_run):
    stdout, _ = tiny_run
    assert "== small_cnn @ tiny: B=2, mu=1, 6 images/step" in stdout
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split() == ["variant", "ms/step", "fastest", "images/s", "peak", "MB"]
    printed = {line.split()[0] for line in lines[header + 1 : header + 1 + len(VARIANT_ROWS)]}
    assert printed == VARIANT_ROWS
    for name in (
        "hard-taylor time / ideal-taylor",
        "soft time / hard-taylor",
        "reduced-taylor time / distill",
    ):
        target = next(line for line in lines if line.startswith(name))
        assert target.split()[-1] in ("PASS", "MISS")
    assert "runtime" in lines[-1]


def test_step_speed_tiny_json_holds_every_figure(tiny_run):
    _, report = tiny_run
    for key in ("device", "torch", "threads", "amp", "channels_last", "steps", "warmup", "memory_method", "runtime_s"):
        assert key in report
    assert report["steps"] == 2 and report["warmup"] == 1 and report["threads"] == 1
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == VARIANT_ROWS
    for name, row in rows.items():
        assert row["model"] == "small_cnn" and row["shape"] == "tiny" and row["images_per_step"] == 6
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0
        if name.startswith("ideal"):
            assert row["peak_mb"] is None and row["components_ms"]
        else:
            assert len(row["ms_steps"]) == 2 and row["ms_min"] == min(row["ms_steps"])
            if sys.platform == "linux":
                assert row["peak_mb"] is not None and row["peak_mb"] > 0
    ideal = rows["ideal-taylor"]
    assert ideal["ms_per_step"] == pytest.approx(
        sum(ms * (2 if k == "student_fwd_nograd_l_fp32" else 1) for k, ms in ideal["components_ms"].items())
    )
    assert len(report["targets"]) == 6
    assert {"date", "machine", "revision", "command"} <= set(report)  # the stamp
    for t in report["targets"]:
        assert {"model", "shape", "name", "value", "op", "limit", "passed"} <= set(t)
        assert ("bound" in t) == (not t["passed"])


def test_step_speed_rejects_unknown_variant(step_speed, capsys):
    args = step_speed.get_args_parser().parse_args(["--variants", "hard-taylor,fast"])
    assert step_speed.main(args) == 2
    assert "fast" in capsys.readouterr().err


def test_check_targets_compares_ratios_with_the_issue_goals(step_speed):
    rows = [
        {"variant": "hard-taylor", "ms_per_step": 100.0, "peak_mb": 50.0},
        {"variant": "ideal-taylor", "ms_per_step": 95.0, "peak_mb": None},
        {"variant": "soft", "ms_per_step": 300.0, "peak_mb": 80.0},
        {"variant": "distill", "ms_per_step": 50.0, "peak_mb": 40.0},
        {"variant": "reduced-dot", "ms_per_step": 55.0, "peak_mb": 41.0},
    ]
    targets = {t["name"]: t for t in step_speed.check_targets(rows)}
    assert set(targets) == {"hard-taylor time / ideal-taylor", "soft time / hard-taylor", "reduced-dot time / distill"}
    assert targets["hard-taylor time / ideal-taylor"]["passed"]
    assert targets["reduced-dot time / distill"]["value"] == pytest.approx(1.1)
    assert targets["reduced-dot time / distill"]["passed"]
    soft = targets["soft time / hard-taylor"]
    assert soft["value"] == pytest.approx(3.0) and not soft["passed"] and "JVP" in soft["bound"]


def test_no_benchmark_builds_an_mpl_step_or_an_optimizer_by_hand():
    """Every timed step is the library's (``mpl_update``, ``make_sgd``), built in ``benchmarks.steps``."""
    for path in (REPO / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "torch.optim.SGD(" not in text and "sys.path" not in text, path.name
        if path.name != "steps.py":
            assert "mpl_update(" not in text or path.name == "hostile_probe.py", path.name


def test_gpu_check_commands(gpu_check, tmp_path):
    args = gpu_check.get_args_parser().parse_args(["--steps", "1500", "--data", "cifar.tar.gz"])
    args.tiny = False
    bench = gpu_check.bench_command(args, tmp_path)
    for flag in ("--device cuda", "--amp bf16", "--channels-last", "--models wrn28_2", "--shapes paper"):
        assert flag in " ".join(bench)
    train = " ".join(gpu_check.train_command(args, tmp_path / "run"))
    for flag in (
        "-m metapl train",
        "--dataset cifar10",
        "--data-dir cifar.tar.gz",
        "--cache-dir .devdata/cache",
        "--amp bf16",
        "--channels-last",
        "--workers 8",
        "--steps 1500",
        "--eval-every 1000",
        "--s-wait-steps 0",
        "--finetune-steps 0",
        "--augment-on device",
    ):
        assert flag in train
    assert "--compile" not in train
    compiled = gpu_check.get_args_parser().parse_args(["--compile", "--augment-on", "loader"])
    compiled.tiny = False
    assert " --augment-on loader --compile" in " ".join(gpu_check.train_command(compiled, tmp_path / "run"))
    assert "--config cifar10_4k" in train or "--uda-weight 8" in train

    tiny = argparse.Namespace(**{**vars(args), "tiny": True})
    assert "--tiny" in gpu_check.bench_command(tiny, tmp_path)
    tiny_train = " ".join(gpu_check.train_command(tiny, tmp_path / "run"))
    assert "--dataset digits" in tiny_train and "--device cpu" in tiny_train and "--steps 2" in tiny_train


def test_gpu_check_projects_the_protocol_from_the_metrics(gpu_check):
    records = [
        {"step": 100, "train/time/step_ms": 500.0, "train/time/images_per_s": 1920.0},  # warm-up interval: ignored
        {"step": 200, "train/time/step_ms": 60.0, "train/time/images_per_s": 16000.0},
        {"step": 300, "train/time/step_ms": 50.0, "train/time/images_per_s": 19200.0},
        {"step": 400, "train/time/step_ms": 70.0, "train/time/images_per_s": 13700.0},
        {"step": 400, "eval/ema_acc": 41.5, "eval/student_acc": 40.0},
    ]
    figures = gpu_check.summarize_training(records, [(200, 10.0), (400, 24.0)])
    assert figures["ms_per_step"] == 60.0 and figures["images_per_s"] == 16000.0
    assert figures["ema_acc"] == 41.5 and figures["eval_step"] == 400 and figures["steps_done"] == 400
    assert figures["projected_steps_h"] == pytest.approx(300_000 * 0.060 / 3600)
    assert figures["projected_with_eval_h"] == pytest.approx(300_000 * (14.0 / 200) / 3600)
    assert gpu_check.summarize_training([], [])["projected_steps_h"] is None


def test_loader_speed_tiny_on_the_real_cifar10(cifar10_cache_dir, cifar10_tar):
    res = _bench(
        "loader_speed",
        "--tiny",
        "--data",
        str(cifar10_tar),
        "--cache-dir",
        str(cifar10_cache_dir),
        "--num-labeled",
        "40",
        "--batch-size",
        "4",
        "--mu",
        "2",
        "--workers",
        "1",
        "--threads",
        "1",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for line in res.stdout.splitlines():
        for name in ("loaders alone (delivered)", "hard-MPL step alone (consumed)", "MPL step fed by the loaders"):
            if line.startswith(name):
                rows[name] = [float(v) for v in line[len(name) :].split()]
    assert len(rows) == 3
    for steps_per_s, views_per_s, ms in rows.values():
        assert steps_per_s > 0 and views_per_s == pytest.approx(steps_per_s * 4 * (1 + 2 * 2), rel=0.02, abs=1)
        assert ms == pytest.approx(1000 / steps_per_s, rel=0.02)
    assert "x its rate" in res.stdout and "3 timed steps" in res.stdout


def test_ablation_runs_in_pieces_pairs_seeds_and_reports(fashion_dir, tmp_path):
    ablation = _load("ablation")
    root, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["--protocol", "fashion", "--root", str(root), "--steps", "2", "--cache-dir", str(cache)]
    assert ablation.main([*common, "--rows", "labels-only,uda-distill", "--seeds", "0,1"]) == 0
    first = root / "fashion" / "labels-only" / "seed0" / "summary.json"
    stamp = first.stat().st_mtime_ns
    assert ablation.main([*common, "--rows", "labels-only", "--seeds", "0"]) == 0  # finished: not trained again
    assert first.stat().st_mtime_ns == stamp

    labels_only = json.loads(first.read_text())
    distilled = json.loads((root / "fashion" / "uda-distill" / "seed0" / "summary.json").read_text())
    # Every final model gets the same optimizer-step count: 2 MPL steps + 1 finetuning step vs 3 labels-only steps.
    assert labels_only["steps"] == 3 and "finetuned_acc" not in labels_only
    assert distilled["steps"] == 2 and distilled["finetune_steps"] == 1
    # Seeds are paired: the same labeled split for every row of a seed.
    splits = {
        row: json.loads((root / "fashion" / row / "seed1" / "split.json").read_text())["labeled"]
        for row in ("labels-only", "uda-distill")
    }
    assert splits["labels-only"] == splits["uda-distill"]

    png = tmp_path / "ablation.png"
    table = ablation.report(root, "fashion", png)
    runs = ablation.collect(root, "fashion")
    assert runs["uda-distill"][0]["final"] == distilled["finetuned_acc"]
    assert (
        runs["labels-only"][1]["final"]
        == json.loads((root / "fashion" / "labels-only" / "seed1" / "summary.json").read_text())["student_acc"]
    )
    diffs = [runs["uda-distill"][s]["final"] - runs["labels-only"][s]["final"] for s in (0, 1)]
    mean = sum(diffs) / 2
    assert f"| uda-distill − labels-only | 2 | {mean:+.2f} |" in table
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        ablation.main([*common, "--rows", "mpl-nope"])


def test_ablation_and_reduced_take_their_statistics_from_the_library():
    from metapl.engine import compare

    ablation, reduced = _load("ablation"), _load("reduced")
    harness = _load("harness")
    assert harness.paired_interval is compare.paired_interval and ablation.paired_lines is reduced.paired_lines
    assert reduced.paired_lines.__module__ == "benchmarks.harness" and ablation.run_rows is harness.run_rows
    assert ablation.mean_sd is reduced.mean_sd is compare.mean_sd and ablation.final_model is compare.kept_model


def test_gpu_ablation_tiny_runs_three_rows_concurrently_and_tabulates(tmp_path, capsys):
    gpu_ablation = _load("gpu_ablation")
    assert gpu_ablation.main(["--tiny", "--root", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 0
    runs = tmp_path / "cifar10-gpu"
    steps = {row: json.loads((runs / row / "seed0" / "summary.json").read_text())["steps"] for row in gpu_ablation.ROWS}
    assert steps == {"labels-only": 3, "uda-distill": 2, "uda-mpl": 2}  # 2 MPL steps + 1 finetuning step each
    table = (tmp_path / "table.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == list(gpu_ablation.ROWS)
    assert table in capsys.readouterr().out
    # The real recipe runs on the GPU with the paper's model: the ablation's CPU default must not override it.
    gpu = gpu_ablation.recipe(gpu_ablation.get_args_parser().parse_args([]))
    gpu_ablation.ablation.PROTOCOLS["gpu-check"] = gpu
    values = gpu_ablation.ablation.run_values("gpu-check", "uda-mpl", 0)
    assert (values["device"], values["teacher"], values["amp"], values["steps"]) == ("cuda", "wrn28_2", "bf16", 2000)


def test_step_speed_profile_tiny_lists_what_the_soft_step_adds():
    res = _bench("step_speed", "--profile", "--models", "small_cnn", "--shapes", "tiny", "--top", "3", "--threads", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("small_cnn, shape tiny (B 2, μ 1), cpu") and "soft" in lines[0]
    assert lines[1].startswith("| operator | hard ms | soft ms |")
    assert len(lines) == 3 + 3 + 1  # title, header, rule, 3 operators, the total


def test_busy_share_times_a_demo_in_a_fresh_process():
    res = _bench("busy_share", "--steps", "2", "--conditions", "idle-fixed")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("idle-fixed: ") and res.stdout.rstrip().endswith(" s")
    bad = _bench("busy_share", "--conditions", "noisy-auto")
    assert bad.returncode == 2 and "unknown condition(s) ['noisy-auto']" in bad.stderr


def test_config_cost_tiny_times_a_shipped_config(tmp_path, capsys):
    config_cost = _load("config_cost")
    out = tmp_path / "cost.json"
    result = config_cost.main(
        [str(REPO / "src" / "metapl" / "configs" / "svhn_1k.yaml"), "--tiny", "--threads", "1", "--json", str(out)]
    )
    assert (result["batch"], result["mu"], result["size"], result["classes"]) == (1, 1, 32, 10)
    assert result["teacher_params"] == result["student_params"] == 1_467_610  # WRN-28-2, 10 classes
    assert result["ms_per_step"] > 0 and json.loads(out.read_text()) == result
    assert (tmp_path / "command.txt").read_text().startswith("cost.json: ")  # the command, stamped, beside it
    assert "== " in capsys.readouterr().out


def test_augment_speed_tiny_prints_both_paths_for_both_config_shapes():
    res = _bench("augment_speed", "--tiny", "--threads", "1", "--workers", "0", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    augment_speed = _load("augment_speed")
    tables = res.stdout.split("\n== ")[1:]
    assert [t.split(" (")[0] for t in tables] == ["32x32x3", "28x28x1"]
    for table, views in zip(tables, (16 * (1 + 2 * 4), 16 * (1 + 2 * 4))):  # B=16, mu=4 in both CPU configs
        rows = {}
        for line in table.splitlines():
            for name in augment_speed.ROWS:
                if line.startswith(name):
                    rows[name] = [float(v) for v in line[len(name) :].split()]
        assert list(rows) == list(augment_speed.ROWS)
        for ms, views_per_s in rows.values():
            assert ms > 0 and views_per_s == pytest.approx(views * 1000 / ms, rel=0.02, abs=1)
        assert "device path / Pillow path views/s:" in table and "2 timed steps" in table


def test_rows_without_finetuning_get_its_steps_and_their_own_h0_control():
    ablation = _load("ablation")
    recipe = ablation.PROTOCOLS["fashion"]
    for row in ("uda-distill-lstrong", "uda-mpl-lstrong", "labels-only"):
        values = ablation.run_values("fashion", row, 0)
        assert (values["steps"], values["finetune_steps"]) == (recipe["steps"] + recipe["finetune_steps"], 0), row
        assert "fold_finetune" not in values  # not a TrainConfig field
    assert ablation.run_values("fashion", "uda-mpl", 0)["finetune_steps"] == recipe["finetune_steps"]
    controls = dict(ablation.FEEDBACK)
    assert controls["uda-mpl-lstrong"] == "uda-distill-lstrong" and controls["uda-mpl-soft"] == "uda-distill-soft"
    assert controls["uda-mpl-dot-reversed"] == "uda-distill" and controls["uda-mpl-soft-reversed"] == "uda-distill-soft"


def test_bn_recalibrate_replaces_running_statistics_by_the_data_average():
    bn = _load("bn_recalibrate")
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    batches = [(3.0 + 2.0 * torch.randn(8, 2, 4, 4, generator=gen), torch.zeros(8, dtype=torch.long)) for _ in range(5)]
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 3))
    weights = [p.detach().clone() for p in model.parameters()]
    bn.reestimate_batchnorm(model, batches, batches=4)  # the fifth batch is not used
    images = torch.cat([x for x, _ in batches[:4]])
    norm = model[0]
    assert torch.allclose(norm.running_mean, images.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x, _ in batches[:4]]).mean(0)
    assert torch.allclose(norm.running_var, per_batch_var, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    # accuracy: the share of argmax hits, in eval mode
    labels = model.eval()(batches[0][0]).argmax(1)
    assert bn.accuracy(model, [(batches[0][0], labels)]) == 100.0
    assert bn.accuracy(model, [(batches[0][0], (labels + 1) % 3)]) == 0.0


def test_shipped_strong_recipe_is_the_ablation_row_it_reports():
    """The shipped fashion_100_strong_cpu config is what the README's +3 row trained: a drift would falsify it."""
    ablation = _load("ablation")
    shipped = yaml.safe_load(shipped_configs()["fashion_100_strong_cpu"].read_text())
    measured = ablation.run_values("fashion", "uda-distill-lstrong", 0)
    bookkeeping = {"save_every", "workers"}  # where and how often files are written, not the recipe
    assert {k: v for k, v in shipped.items() if k not in bookkeeping} == {
        k: measured[k] for k in shipped if k not in bookkeeping
    }


def test_harness_skips_finished_runs_and_redoes_killed_ones(tmp_path, monkeypatch):
    harness = _load("harness")
    trained = []

    def fake_train_row(cfg, *, fresh=False, log=print):
        trained.append((cfg.out, fresh))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)  # what the trainer's run folder would be
        return {"seed": cfg.seed, "student_acc": 50.0}, "new"

    monkeypatch.setattr("metapl.engine.compare.train_row", fake_train_row)
    values = dict(dataset="digits", num_labeled=20, steps=2, seed=3, device="cpu")
    out = tmp_path / "row" / "seed3"
    first = harness.train_once(out, values)
    assert trained == [(str(out), False)] and first["wall_seconds"] >= 0
    assert harness.train_once(out, values) == first  # finished: read back, not trained again
    assert len(trained) == 1
    (out / "summary.json").unlink()  # killed before its summary: trained again from scratch
    harness.train_once(out, values)
    assert trained[-1] == (str(out), True)
    with pytest.raises(Exception, match="steps"):  # the config layer's checks apply before anything runs
        harness.train_once(tmp_path / "bad", {**values, "steps": -1})


def test_harness_resolves_the_data_root_in_one_place(tmp_path, monkeypatch):
    harness = _load("harness")
    monkeypatch.setattr(harness, "_data_root", None)
    monkeypatch.delenv(harness.DATA_ENV, raising=False)
    assert harness.data_path("fashion-mnist") == REPO.parent / "shared" / "data" / "fashion-mnist"
    monkeypatch.setenv(harness.DATA_ENV, str(tmp_path))
    assert harness.resolve_data_dir({"data_dir": "cifar10-jpeg.tar.gz"}) == {
        "data_dir": str(tmp_path / "cifar10-jpeg.tar.gz")
    }
    harness.set_data_root(tmp_path / "flag")  # --data-root wins over the variable
    assert harness.data_path("x") == tmp_path / "flag" / "x" and harness.data_path("/abs/x") == Path("/abs/x")
    stamp = harness.stamp()
    assert stamp["date"] and stamp["machine"] and "revision" in stamp


def test_reduced_protocol_trains_the_teacher_once_and_reports_with_its_time(fashion_dir, tmp_path):
    reduced = _load("reduced")
    root, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["--protocol", "fashion", "--root", str(root), "--steps", "2", "--cache-dir", str(cache)]
    assert reduced.main([*common, "--rows", "labels-only,distill,reduced-taylor", "--seeds", "0"]) == 0
    teacher = root / "fashion" / "teacher" / "seed0"
    stamp = (teacher / "summary.json").stat().st_mtime_ns
    assert reduced.main([*common, "--rows", "reduced-dot", "--seeds", "0"]) == 0  # the same teacher, not retrained
    assert (teacher / "summary.json").stat().st_mtime_ns == stamp
    config = yaml.safe_load((root / "fashion" / "reduced-dot" / "seed0" / "config.yaml").read_text())
    assert config["method"] == "reduced-mpl" and config["teacher_weights"] == str(teacher)
    summary = json.loads((root / "fashion" / "distill" / "seed0" / "summary.json").read_text())
    big = json.loads((teacher / "summary.json").read_text())
    # The fixed reduced teacher is the identity: the large teacher (its EMA) on the same 200 test images.
    assert summary["teacher_acc"] == big["ema_acc"]
    runs = reduced.collect(root, "fashion")
    assert runs["distill"][0]["seconds"] == summary["wall_seconds"] + big["wall_seconds"]
    table = reduced.report(root, "fashion")  # one seed: the rows, no intervals (paired_lines: the ablation's test)
    assert f"| distill | 1 | {summary['finetuned_acc']:.2f} ± 0.00 | {summary['teacher_acc']:.2f} ± 0.00 |" in table
    for protocol in reduced.PROTOCOLS:  # every row of every protocol is a valid config, at full budget too
        for row in reduced.ROWS:
            for steps in (None, 4):
                TrainConfig(**reduced.run_values(protocol, row, 0, root, steps))
