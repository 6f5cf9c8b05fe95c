"""One result per run (``metapl.rundir.result``): chosen on validation images or by rule, never on the test set, and
the model every command uses."""

from __future__ import annotations

import json

import pytest

from metapl.config.fields import TrainConfig, auto_val_count
from metapl.errors import UserError
from metapl.rundir.layout import save_config
from metapl.rundir.result import candidates, choose_result, read_result

ACCS = {"teacher_acc": 70.0, "student_acc": 60.0, "ema_acc": 61.0, "finetuned_acc": 90.0}


def test_validation_chooses_and_the_test_set_does_not():
    val = {"val_teacher_acc": 80.0, "val_student_acc": 75.0, "val_ema_acc": 76.0, "val_finetuned_acc": 79.0}
    result = choose_result(["teacher", "student", "ema", "finetuned"], {**ACCS, **val}, num_val=100)
    # The finetuned student is best on the test set (90 %) but the teacher on validation: the teacher is handed back.
    assert (result.role, result.file, result.network) == ("teacher", "checkpoint.pt", "teacher")
    assert (result.val_acc, result.test_acc) == (80.0, 70.0)
    assert result.chosen_by == "validation accuracy on 100 images"


def test_a_tie_on_validation_goes_to_the_cheaper_model_and_finetuned_lives_in_its_file():
    val = {"val_teacher_acc": 80.0, "val_student_acc": 80.0, "val_ema_acc": 80.0, "val_finetuned_acc": 80.0}
    result = choose_result(["teacher", "student", "ema", "finetuned"], {**ACCS, **val}, num_val=10)
    assert (result.role, result.file, result.network) == ("finetuned", "finetuned.pt", "student")


def test_without_validation_the_rule_decides():
    result = choose_result(["teacher", "student", "ema"], ACCS, num_val=0)
    assert result.role == "ema" and result.val_acc is None and result.chosen_by.startswith("rule (")
    assert choose_result(["student"], ACCS, num_val=0).role == "student"


def test_the_teacher_is_a_candidate_only_of_the_students_architecture_in_full_mpl():
    assert candidates("mpl", "small_cnn", "small_cnn", ACCS) == ["teacher", "student", "ema", "finetuned"]
    assert candidates("mpl", "wrn28_2", "small_cnn", ACCS) == ["student", "ema", "finetuned"]
    assert candidates("distill", "small_cnn", "small_cnn", ACCS) == ["student", "ema", "finetuned"]
    # Only the models a run scored: no EMA, no finetuning.
    assert candidates("supervised", "small_cnn", "small_cnn", {"student_acc": 50.0}) == ["student"]


def test_automatic_carve_out_needs_fifty_labels_in_every_class():
    assert auto_val_count(40 * 10, 10) == 0  # 40 per class: chosen by rule
    assert auto_val_count(1000, 10) == 100  # 100 per class: 10 each held out
    assert auto_val_count(4000, 10) == 400
    assert auto_val_count(1720, 43) == 0


def test_an_unfinished_run_falls_back_to_its_latest_ema_saying_so(tmp_path, log_lines):
    save_config(TrainConfig(ema=0.99), tmp_path / "config.yaml")
    (tmp_path / "summary.json").write_text(json.dumps({"teacher_acc": 3.0}))
    result = read_result(tmp_path)
    assert (result.role, result.file, result.network) == ("ema", "checkpoint.pt", "ema")
    assert log_lines() == [
        f"warning: {tmp_path} has not finished (its summary.json names no result yet); using the EMA student of its "
        "latest checkpoint.pt"
    ]
    save_config(TrainConfig(ema=0.0), tmp_path / "config.yaml")
    assert read_result(tmp_path).role == "student"
    (tmp_path / "summary.json").write_text(json.dumps({"result": {"role": "ema"}}))
    with pytest.raises(UserError, match="damaged 'result'"):
        read_result(tmp_path)


def test_unset_step_counts_scale_with_the_budget():
    for steps in (300, 1000, 3000, 30_000):
        plan = TrainConfig(steps=steps).schedule()
        assert plan.t_warmup_steps == steps // 20 and plan.s_wait_steps == steps // 10
        assert plan.uda_steps == steps // 5 and plan.finetune_steps == steps // 10
        assert plan.eval_every == min(1000, steps // 10) and plan.save_every == 2 * plan.eval_every
    given = TrainConfig(steps=300, s_wait_steps=7, eval_every=5, save_every=11).schedule()
    assert (given.s_wait_steps, given.eval_every, given.save_every) == (7, 5, 11)
    labels_only = TrainConfig(steps=300, method="supervised").schedule()
    assert labels_only.s_wait_steps == 0 and labels_only.finetune_steps == 0
