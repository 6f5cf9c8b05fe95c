"""Smoke tests of issue 29's benchmarks: the soak (a tiny run resumed and extended, sampled from outside) and the
paths probe; and the soak's figures on made-up samples, where the right answer is known."""

from __future__ import annotations

import json

from conftest import benchmark_module


def test_soak_tiny_trains_resumes_extends_and_reports_every_target(tmp_path):
    soak = benchmark_module("soak")
    run, out = tmp_path / "run", tmp_path / "results"
    argv = ["--steps", "20", "--extend-to", "30", "--every", "10", "--log-every", "5", "--interval", "0.1"]
    assert soak.main([*argv, "--root", str(run), "--out-dir", str(out)]) == 0
    result = json.loads((out / "soak.json").read_text())
    assert json.loads((run / "summary.json").read_text())["steps"] == 30  # the extended run finished
    phases = [s["phase"] for s in result["samples"]]
    assert {"train", "extend"} <= set(phases) and phases.index("extend") > phases.index("train")
    assert set(result["targets"]) == {
        "rss_growth_mb",
        "fds_growth",
        "threads_growth",
        "children_growth",
        "kept_peak_mb",
        "log_rate_ratio",
    }
    assert all(s["rss_mb"] > 0 and s["threads"] >= 1 for s in result["samples"])
    assert (out / "soak.png").stat().st_size > 10_000
    assert (out / "command.txt").read_text().startswith("soak.json: ")


def _samples(rss, fds=20, phase="train"):
    return [
        {"t": i, "phase": phase, "step": 10 * (i + 1), "rss_mb": r, "fds": fds, "threads": 4, "children": 2}
        | {"kept_mb": 1.0, "logs_mb": 0.01 * i}
        for i, r in enumerate(rss)
    ]


def test_soak_growth_is_measured_after_the_warm_up_between_the_first_and_last_tenth():
    soak = benchmark_module("soak")
    samples = _samples([10.0] * 10 + [800.0 + i for i in range(90)])  # start-up, then 1 MB per sample
    figure = soak.growth(samples, "rss_mb", warmup=0.1)
    assert figure == {"first": 804.0, "last": 885.0, "growth": 81.0, "min": 800.0, "max": 889.0}
    assert soak.log_rate(samples, "train") == 1048.58  # 0.99 MiB over 990 steps


def test_soak_targets_miss_a_leak_and_pass_a_flat_run(tmp_path):
    soak = benchmark_module("soak")
    (tmp_path / "checkpoint.pt").write_bytes(b"x" * 2**20)
    flat = _samples([800.0] * 50) + _samples([800.0] * 50, phase="extend")
    leaking = _samples([800.0 + i for i in range(100)], fds=0)
    for i, s in enumerate(leaking):
        s["fds"] = 20 + i // 10  # one descriptor more every ten samples
    met = {k: t["met"] for k, t in soak.evaluate(flat, tmp_path, 0.1)["targets"].items()}
    assert met == dict.fromkeys(met, True)
    missed = soak.evaluate(leaking, tmp_path, 0.1)["targets"]
    assert not missed["rss_growth_mb"]["met"] and missed["rss_growth_mb"]["value"] == 81.0
    assert not missed["fds_growth"]["met"] and missed["fds_growth"]["value"] == 8
    assert not missed["log_rate_ratio"]["met"]  # no extended phase: no ratio to judge


def test_paths_probe_counts_a_case(capsys):
    probe = benchmark_module("paths_probe")
    results = probe.main(["--only", "a symlink loop"])
    assert list(results) == ["folder: a symlink loop"] and results["folder: a symlink loop"]["clean"] is True
    assert capsys.readouterr().out.splitlines()[-1] == "clean: 1 of 1"
