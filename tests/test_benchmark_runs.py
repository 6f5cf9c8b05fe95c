"""Smoke tests of the benchmarks that train runs (the ablation, the GPU ablation, the Reduced MPL protocol) and of the
harness they share: tiny budgets, real code paths; the figures themselves come from benchmarks/README.md's commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, benchmark_module
from metapl.config.fields import config_from_dict
from metapl.config.recipes import shipped_configs


def test_ablation_runs_in_pieces_pairs_seeds_and_reports(fashion_dir, tmp_path):
    ablation = benchmark_module("ablation")
    root, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["--protocol", "fashion", "--root", str(root), "--steps", "2", "--cache-dir", str(cache)]
    assert ablation.main([*common, "--rows", "labels-only,uda-distill,fixmatch", "--seeds", "0,1"]) == 0
    first = root / "fashion" / "labels-only" / "seed0" / "summary.json"
    stamp = first.stat().st_mtime_ns
    assert ablation.main([*common, "--rows", "labels-only", "--seeds", "0"]) == 0  # finished: not trained again
    assert first.stat().st_mtime_ns == stamp

    labels_only = json.loads(first.read_text())
    distilled = json.loads((root / "fashion" / "uda-distill" / "seed0" / "summary.json").read_text())
    # Every final model gets the same optimizer-step count: 2 MPL steps + 1 finetuning step vs 3 labels-only steps.
    assert labels_only["steps"] == 3 and "finetuned_acc" not in labels_only
    assert distilled["steps"] == 2 and distilled["finetune_steps"] == 1
    fixmatch = json.loads((root / "fashion" / "fixmatch" / "seed0" / "summary.json").read_text())
    assert fixmatch["steps"] == 3 and "finetuned_acc" not in fixmatch  # one network, no finetuning: as labels-only
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
    fixmatch_diffs = [runs["fixmatch"][s]["final"] - runs["uda-distill"][s]["final"] for s in (0, 1)]
    assert f"| fixmatch − uda-distill | 2 | {sum(fixmatch_diffs) / 2:+.2f} |" in table
    records = [json.loads(line) for line in (root / "fashion" / "fixmatch" / "seed1" / "metrics.jsonl").open()]
    mask = [r["train/mask_ratio"] for r in records if "train/mask_ratio" in r]
    assert f"| seed1 | {sum(mask) / len(mask):.2f} | " in table  # 3 steps: all of them are the last 500
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        ablation.main([*common, "--rows", "mpl-nope"])


def test_ablation_and_reduced_take_their_statistics_from_the_library():
    from metapl.protocol import paired

    ablation, reduced = benchmark_module("ablation"), benchmark_module("reduced")
    harness = benchmark_module("harness")
    assert harness.paired_interval is paired.paired_interval and ablation.paired_lines is reduced.paired_lines
    assert reduced.paired_lines.__module__ == "benchmarks.harness" and ablation.run_rows is harness.run_rows
    assert ablation.mean_sd is reduced.mean_sd is paired.mean_sd and ablation.final_model is harness.protocol_model


def test_gpu_ablation_tiny_runs_three_rows_concurrently_and_tabulates(tmp_path, capsys):
    gpu_ablation = benchmark_module("gpu_ablation")
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


def test_rows_without_finetuning_get_its_steps_and_their_own_h0_control():
    ablation = benchmark_module("ablation")
    recipe = ablation.PROTOCOLS["fashion"]
    for row in ("uda-distill-lstrong", "uda-mpl-lstrong", "labels-only"):
        values = ablation.run_values("fashion", row, 0)
        assert (values["steps"], values["finetune_steps"]) == (recipe["steps"] + recipe["finetune_steps"], 0), row
        assert "fold_finetune" not in values  # not a TrainConfig field
    assert ablation.run_values("fashion", "uda-mpl", 0)["finetune_steps"] == recipe["finetune_steps"]
    controls = dict(ablation.FEEDBACK)
    assert controls["uda-mpl-lstrong"] == "uda-distill-lstrong" and controls["uda-mpl-soft"] == "uda-distill-soft"
    assert controls["uda-mpl-dot-reversed"] == "uda-distill" and controls["uda-mpl-soft-reversed"] == "uda-distill-soft"


def test_shipped_strong_recipe_is_the_ablation_row_it_reports():
    """The shipped fashion_100_strong_cpu config is what the README's +3 row trained: a drift would falsify it."""
    ablation = benchmark_module("ablation")
    shipped = yaml.safe_load(shipped_configs()["fashion_100_strong_cpu"].read_text())
    measured = ablation.run_values("fashion", "uda-distill-lstrong", 0)
    bookkeeping = {"save_every", "workers"}  # where and how often files are written, not the recipe
    assert {k: v for k, v in shipped.items() if k not in bookkeeping} == {
        k: measured[k] for k in shipped if k not in bookkeeping
    }


def test_harness_skips_finished_runs_and_redoes_killed_ones(tmp_path, monkeypatch):
    harness = benchmark_module("harness")
    trained = []

    def fake_train_row(cfg, *, fresh=False):
        trained.append((cfg.out, fresh))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)  # what the trainer's run folder would be
        return {"seed": cfg.seed, "student_acc": 50.0}, "new"

    monkeypatch.setattr("metapl.protocol.rows.train_row", fake_train_row)
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
    harness = benchmark_module("harness")
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
    reduced = benchmark_module("reduced")
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
                config_from_dict(reduced.run_values(protocol, row, 0, root, steps))  # as the harness reads it


def test_new_user_grid_runs_data_flags_only_reports_the_handed_back_model_and_skips_finished_runs(tmp_path):
    new_user = benchmark_module("new_user")
    root = tmp_path / "runs"
    argv = ["--cells", "digits-50", "--steps", "4", "--root", str(root), "--cache-dir", str(tmp_path / "c")]
    assert new_user.main([*argv, "--seeds", "0,1"]) == 0
    run = root / "digits-50" / "4"
    metapl = json.loads((run / "metapl" / "seed0" / "summary.json").read_text())
    config = yaml.safe_load((run / "metapl" / "seed0" / "config.yaml").read_text())
    # Data flags only: every other option at its default (the seed and the quiet console aside).
    assert (config["num_labeled"], config["steps"], config["method"], config["labeled_aug"]) == (50, 4, "mpl", "auto")
    strong = yaml.safe_load((run / "labels-strong" / "seed0" / "config.yaml").read_text())
    assert (strong["method"], strong["labeled_aug"]) == ("supervised", "strong")
    stamp = (run / "metapl" / "seed0" / "summary.json").stat().st_mtime_ns
    assert new_user.main([*argv, "--seeds", "0"]) == 0  # finished: not trained again
    assert (run / "metapl" / "seed0" / "summary.json").stat().st_mtime_ns == stamp

    runs = new_user.collect(root)
    assert runs["digits-50"][4]["metapl"][0]["acc"] == metapl[f"{metapl['result']['role']}_acc"]
    table = new_user.report(root)
    accs = {row: [runs["digits-50"][4][row][s]["acc"] for s in (0, 1)] for row in new_user.ROWS}
    diffs = [m - b for m, b in zip(accs["metapl"], accs["labels-only"])]
    assert f"| {sum(diffs) / 2:+.2f} [" in table and table.splitlines()[2].startswith("| digits-50 | 4 | 2 |")


def test_defaults_sweep_holds_validation_images_out_and_reports_every_role(tmp_path):
    sweep = benchmark_module("defaults_sweep")
    root = tmp_path / "runs"
    argv = ["--cells", "digits-50", "--variants", "labels,base", "--steps", "20", "--root", str(root)]
    assert sweep.main([*argv, "--cache-dir", str(tmp_path / "c")]) == 0
    summary = json.loads((root / "digits-50" / "20" / "base" / "seed0" / "summary.json").read_text())
    assert summary["num_labeled"] == 50 and summary["num_val"] == 250  # the cell's 50 labels, 250 held out
    config = yaml.safe_load((root / "digits-50" / "20" / "base" / "seed0" / "config.yaml").read_text())
    assert (config["s_wait_steps"], config["uda_steps"], config["finetune_steps"]) == (2, 4, 2)  # fractions of 20
    entry = sweep.collect(root)["digits-50"][20]["base"][0]
    assert entry["teacher"] == summary["val_teacher_acc"] and entry["finetuned"] == summary["val_finetuned_acc"]
    assert "| digits-50 | 20 | base | 1 |" in sweep.report(root)
