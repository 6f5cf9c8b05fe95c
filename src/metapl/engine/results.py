"""A training run's results: its models' accuracies, the line logged after each evaluation, ``summary.json``."""

from __future__ import annotations

from metapl.core import unwrap
from metapl.engine.evaluate import evaluate_sets, validation_images
from metapl.engine.reduced import reduced_teacher_accuracy
from metapl.engine.runtime import barrier


def evaluate_run(run, loaders: dict[str, object]) -> dict[str, float]:
    """Accuracies of teacher, student and EMA on each loader; validation keys carry a ``val_`` prefix."""
    out = {}
    if run.dist.is_main:
        models = {"teacher": unwrap(run.teacher), "student": unwrap(run.student)}
        if run.cfg.method != "mpl":  # no teacher, or one that reads stored predictions rather than images
            models.pop("teacher")
        if run.ema is not None:
            models["ema"] = run.ema.module
        out = evaluate_sets(models, loaders, run.device, amp_dtype=run.amp_dtype, channels_last=run.cfg.channels_last)
        if run.predictions is not None:
            out.update(
                reduced_teacher_accuracy(
                    unwrap(run.teacher), run.predictions, run.data, run.split, run.device, run.cfg.eval_limit
                )
            )
    barrier(run.dist)
    return out


def eval_line(step: int, accs: dict[str, float]) -> str:
    """The line ``metapl train`` logs after an evaluation: test accuracies, then validation ones."""

    def listing(prefix: str) -> str:
        return ", ".join(
            f"{k[len(prefix) : -4]} {v:.2f}%"
            for k, v in accs.items()
            if k.endswith("_acc") and k.startswith("val_") == (prefix == "val_")
        )

    val = f"; validation accuracy {listing('val_')}" if "val_student_acc" in accs else ""
    return f"step {step}: test accuracy {listing('')}{val}"


def run_summary(run, accs: dict[str, float]) -> dict:
    """What ``summary.json`` holds after training (before finetuning adds its own and the result is chosen):
    accuracies, validation size, settings."""
    cfg = run.cfg
    summary = {
        "teacher_acc": accs.get("teacher_acc"),
        "student_acc": accs.get("student_acc"),
        "ema_acc": accs.get("ema_acc"),
        "teacher_top5": accs.get("teacher_top5"),
        "student_top5": accs.get("student_top5"),
        "ema_top5": accs.get("ema_top5"),
        **{k: v for k, v in accs.items() if k.startswith("val_") and k.endswith("_acc")},
        "steps": run.step,
        "seconds": round(run.seconds, 2),
        "method": cfg.method,
        "mode": cfg.mode,
        "feedback": cfg.feedback,
        "feedback_sign": cfg.feedback_sign,
        "dataset": cfg.dataset,
        "num_labeled": len(run.split.labeled),
        "num_val": len(val) if (val := validation_images(run.data, run.split, cfg.eval_limit)) is not None else 0,
        "seed": cfg.seed,
    }
    if run.predictions is not None:
        summary["large_teacher_acc"] = run.predictions.test_accuracy(run.data.test.labels)
    return summary
