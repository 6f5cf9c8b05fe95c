"""One result per run (``metapl.rundir.result``): chosen on validation images or by rule, never on the test set, and
the model every command uses."""

from __future__ import annotations

import json

import pytest

from metapl.config.budget import auto_val_count
from metapl.config.fields import TrainConfig
from metapl.errors import UserError
from metapl.methods.by_name import get_method
from metapl.rundir.layout import save_config
from metapl.rundir.result import candidates, choose_result, read_result

MPL = get_method("mpl").result_rule

ACCS = {"teacher_acc": 70.0, "student_acc": 60.0, "ema_acc": 61.0, "finetuned_acc": 90.0}


def test_validation_chooses_and_the_test_set_does_not():
    val = {"val_teacher_acc": 80.0, "val_student_acc": 75.0, "val_ema_acc": 76.0, "val_finetuned_acc": 79.0}
    result = choose_result(["teacher", "student", "ema", "finetuned"], {**ACCS, **val}, num_val=100, rule=MPL)
    # The finetuned student is best on the test set (90 %) but the teacher on validation: the teacher is handed back.
    assert (result.role, result.file, result.network) == ("teacher", "checkpoint.pt", "teacher")
    assert (result.val_acc, result.test_acc) == (80.0, 70.0)
    assert result.chosen_by == "validation accuracy on 100 images"


def test_a_tie_on_validation_goes_to_the_cheaper_model_and_finetuned_lives_in_its_file():
    val = {"val_teacher_acc": 80.0, "val_student_acc": 80.0, "val_ema_acc": 80.0, "val_finetuned_acc": 80.0}
    result = choose_result(["teacher", "student", "ema", "finetuned"], {**ACCS, **val}, num_val=10, rule=MPL)
    assert (result.role, result.file, result.network) == ("finetuned", "finetuned.pt", "student")


def test_without_validation_the_methods_rule_decides():
    result = choose_result(["teacher", "student", "ema", "finetuned"], ACCS, num_val=0, rule=MPL)
    assert (result.role, result.val_acc) == ("teacher", None)
    assert result.chosen_by == (
        "rule (the teacher, else the finetuned student, else the EMA student, else the student; no validation images)"
    )
    # Without the teacher (another architecture), the next in the method's order; a distilled student keeps its EMA.
    assert choose_result(["student", "ema", "finetuned"], ACCS, num_val=0, rule=MPL).role == "finetuned"
    assert (
        choose_result(["student", "ema", "finetuned"], ACCS, num_val=0, rule=get_method("distill").result_rule).role
        == "ema"
    )
    assert choose_result(["student"], ACCS, num_val=0, rule=MPL).role == "student"


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


def test_labeled_views_follow_the_passes_over_the_labels_and_the_plan_line_says_what_was_derived():
    from metapl.config.budget import plan_line

    assert TrainConfig(steps=300, batch_size=32).planned_labeled_aug(40) == "strong"  # 240 passes
    assert TrainConfig(steps=300, batch_size=32).planned_labeled_aug(1000) == "weak"  # 9.6 passes
    assert TrainConfig(steps=3125, batch_size=32).planned_labeled_aug(1000) == "strong"  # exactly 100
    assert TrainConfig(steps=300, labeled_aug="weak").planned_labeled_aug(40) == "weak"
    assert plan_line(TrainConfig(steps=300, batch_size=32, s_wait_steps=7), 40) == (
        "plan for 300 steps: strong labeled views (each seen ~240 times; strong from 100), teacher warm-up 15, "
        "student warm-up 15, UDA ramp 60, finetuning 30, evaluation every 30, checkpoint every 60 (each has its flag)"
    )
    assert plan_line(TrainConfig(steps=8, labeled_aug="weak"), 40).endswith(
        "; --steps 8 is too short for: teacher warm-up, student waits, student warm-up, finetuning (0 steps)"
    )


def test_the_shipped_recipes_keep_the_values_they_ran_with():
    from metapl.config.recipes import find_config, load_yaml

    for name in ("cifar10_4k", "fashion_100_cpu", "cifar10_cpu"):
        cfg = TrainConfig(**load_yaml(find_config(name)))
        assert (cfg.labeled_aug, cfg.val_labeled) == ("weak", 0)
        assert None not in (cfg.t_warmup_steps, cfg.s_wait_steps, cfg.uda_steps, cfg.eval_every, cfg.save_every)
