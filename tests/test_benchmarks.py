"""Smoke tests of the benchmarks package (``python -m benchmarks.NAME`` from the repository root): the step-speed
benchmark end to end at its tiny size and its operator profile, the loader and augmentation benchmarks, and the GPU
check's pieces that need no GPU (its TINY mode runs the trainer too and takes over 30 s on 2 busy cores, so it is
checked by its parts here and by hand with ``TINY=1 python -m benchmarks.gpu_check``)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from conftest import REPO, benchmark_module, run_benchmark

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


@pytest.fixture(scope="module")
def step_speed():
    return benchmark_module("step_speed")


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_module("gpu_check")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``step_speed --tiny`` run over every variant, as a subprocess (the CPU path forks per variant)."""
    out = tmp_path_factory.mktemp("step_speed") / "out.json"
    res = run_benchmark("step_speed", "--tiny", "--models", "small_cnn", "--threads", "1", "--json", str(out))
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
    res = run_benchmark(
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


def test_step_speed_profile_tiny_lists_what_the_soft_step_adds():
    args = ("--profile", "--models", "small_cnn", "--shapes", "tiny", "--top", "3", "--threads", "1")
    res = run_benchmark("step_speed", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("small_cnn, shape tiny (B 2, μ 1), cpu") and "soft" in lines[0]
    assert lines[1].startswith("| operator | hard ms | soft ms |")
    assert len(lines) == 3 + 3 + 1  # title, header, rule, 3 operators, the total


def test_busy_share_times_a_demo_in_a_fresh_process():
    res = run_benchmark("busy_share", "--steps", "2", "--conditions", "idle-fixed")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("idle-fixed: ") and res.stdout.rstrip().endswith(" s")
    bad = run_benchmark("busy_share", "--conditions", "noisy-auto")
    assert bad.returncode == 2 and "unknown condition(s) ['noisy-auto']" in bad.stderr


def test_config_cost_tiny_times_a_shipped_config(tmp_path, capsys):
    config_cost = benchmark_module("config_cost")
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
    res = run_benchmark("augment_speed", "--tiny", "--threads", "1", "--workers", "0", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    augment_speed = benchmark_module("augment_speed")
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


def test_bn_recalibrate_replaces_running_statistics_by_the_data_average():
    bn = benchmark_module("bn_recalibrate")
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
