"""``MPLConfig`` refuses a value that ``mpl_update`` would ignore in its mode (issue 29), naming the field; the
trainer's ``TrainConfig`` keeps its own message, naming the flags."""

from __future__ import annotations

import dataclasses

import pytest

from metapl import MPLConfig
from metapl.config.fields import TrainConfig
from metapl.errors import UserError

IGNORED = [
    (
        dict(mode="soft", feedback="cosine"),
        "MPLConfig.feedback='cosine' does nothing with mode='soft' (soft mode has the exact meta-gradient, no "
        "estimator of h); leave feedback at its default 'taylor' or use mode='hard'",
    ),
    (
        dict(mode="soft", feedback="dot"),
        "MPLConfig.feedback='dot' does nothing with mode='soft' (soft mode has the exact meta-gradient, no estimator "
        "of h); leave feedback at its default 'taylor' or use mode='hard'",
    ),
    (
        dict(mode="soft", baseline_decay=0.01),
        "MPLConfig.baseline_decay=0.01 does nothing with mode='soft' (soft mode has no h to subtract a baseline "
        "from); leave baseline_decay at its default 0.0 or use mode='hard'",
    ),
    (
        dict(mode="soft", pseudo_label="sample"),
        "MPLConfig.pseudo_label='sample' does nothing with mode='soft' (soft mode's pseudo labels are the whole "
        "distribution); leave pseudo_label at its default 'argmax' or use mode='hard'",
    ),
    (
        dict(mode="soft", teacher_batch="split"),
        "MPLConfig.teacher_batch='split' does nothing with mode='soft' (soft mode always runs one joint teacher "
        "forward); leave teacher_batch at its default 'joint' or use mode='hard'",
    ),
    (
        dict(soft_temperature=2.0),
        "MPLConfig.soft_temperature=2.0 does nothing with mode='hard' (hard pseudo labels are the argmax or a "
        "sample); leave soft_temperature at its default 1.0 or use mode='soft'",
    ),
]


@pytest.mark.parametrize(("values", "message"), IGNORED)
def test_mpl_config_refuses_an_option_its_mode_ignores(values, message):
    with pytest.raises(ValueError) as caught:
        MPLConfig(**values)
    assert str(caught.value) == message


@pytest.mark.parametrize(("values", "message"), IGNORED)
def test_train_config_names_the_flags_instead(values, message):
    with pytest.raises(UserError) as caught:
        TrainConfig(**values)
    assert str(caught.value).startswith(f"--{next(k for k in values if k != 'mode').replace('_', '-')} ")


def test_every_mode_keeps_its_own_options_and_the_defaults_of_the_others():
    soft = MPLConfig(mode="soft", soft_temperature=0.5, feedback_sign="reversed", label_view="strong", mpl_weight=2)
    assert (soft.mode, soft.feedback, soft.soft_temperature) == ("soft", "taylor", 0.5)
    hard = MPLConfig(feedback="cosine", baseline_decay=0.01, pseudo_label="sample", teacher_batch="split")
    assert (hard.feedback, hard.baseline_decay, hard.pseudo_label, hard.teacher_batch) == (
        "cosine",
        0.01,
        "sample",
        "split",
    )
    with pytest.raises(ValueError, match=r"^MPLConfig\.feedback='cosine' does nothing with mode='soft'"):
        dataclasses.replace(hard, mode="soft")  # replace() checks too
    assert TrainConfig(mode="soft").mpl_config() == MPLConfig(mode="soft")
