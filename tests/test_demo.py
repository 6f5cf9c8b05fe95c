"""``metapl demo``: three rows with equal optimizer-step counts, and the gains it prints are the runs' own."""

from __future__ import annotations

import json

from metapl.commands.demo import ROWS, demo, final_accuracy


def test_demo_trains_three_rows_with_equal_step_counts(tmp_path, log_lines):
    summaries = demo(out=str(tmp_path), steps=20)
    assert [name for name, _ in ROWS] == list(summaries)
    labels_only, distilled, mpl = summaries.values()
    # 20 MPL steps + 2 finetuning steps for the pseudo-label rows, 22 steps for labels-only.
    assert labels_only["steps"] == 22 and "finetuned_acc" not in labels_only
    assert distilled["steps"] == mpl["steps"] == 20 and distilled["finetune_steps"] == mpl["finetune_steps"] == 2
    saved = json.loads((tmp_path / "mpl" / "summary.json").read_text())
    role = saved["result"]["role"]  # the model the run handed back, by the method's rule (no validation images)
    assert role == "teacher" and saved[f"{role}_acc"] == final_accuracy(mpl)
    row = next(line for line in log_lines() if line.startswith("Meta Pseudo Labels "))
    assert f" teacher {saved['teacher_acc']:.2f} " in row  # the table names what was handed back
    gain = final_accuracy(mpl) - final_accuracy(labels_only)
    feedback = final_accuracy(mpl) - final_accuracy(distilled)
    assert f"MPL vs labels-only: {gain:+.2f} points; feedback (MPL vs h = 0): {feedback:+.2f} points" in log_lines()[-1]
    # Run again into the same folder: the earlier demo runs are replaced, not refused and not mixed.
    again = demo(out=str(tmp_path), steps=20)
    assert again["Meta Pseudo Labels"]["result"] == mpl["result"]  # same seed, same result
