"""``metapl demo``: MPL against a labels-only baseline on scikit-learn's bundled 8×8 digits, offline, on the CPU.

Both runs use the same model, the same labeled images, the same number of steps and the same student optimizer;
the MPL run also sees the other images of the train split without their labels. The settings live in
``DEMO`` below and are recorded in each run's ``config.yaml``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from metapl.config import TrainConfig
from metapl.train import train

DEMO = TrainConfig(
    dataset="digits",
    num_labeled=50,  # 5 per class
    teacher="small_cnn",
    student="small_cnn",
    steps=600,
    batch_size=16,
    mu=7,
    t_lr=0.05,
    s_lr=0.05,
    weight_decay=5e-4,
    s_wait_steps=50,
    uda_weight=1.0,
    uda_steps=100,
    uda_threshold=0.6,
    randaug_n=2,
    randaug_m=9,
    ema=0.99,
    eval_every=100,
    log_every=20,
    save_every=300,
    workers=2,  # augmentation in 2 worker processes: on 2 cores it, not the step, bounds the speed
    device="cpu",
    tensorboard=False,
)


def demo(*, out: str = "runs/demo", steps: int | None = None, seed: int = 0, log=print) -> dict[str, dict]:
    """Train the labels-only baseline and MPL on digits and print their test accuracies side by side.

    Args:
        out: parent folder of the two run directories (``supervised`` and ``mpl``); earlier demo runs there are
            replaced.
        steps: steps of each run (default ``DEMO.steps``).
        seed: seed of the split, the models and the augmentations.
        log: where lines go.

    Returns:
        ``{"supervised": summary, "mpl": summary}``.
    """
    import shutil

    base = replace(DEMO, seed=seed, steps=steps or DEMO.steps)
    summaries = {}
    for name, cfg in (
        ("supervised", replace(base, method="supervised", out=str(Path(out) / "supervised"))),
        ("mpl", replace(base, method="mpl", out=str(Path(out) / "mpl"))),
    ):
        shutil.rmtree(cfg.out, ignore_errors=True)
        log(f"== {name}: {cfg.steps} steps on digits, {cfg.num_labeled} labels ==")
        start = time.perf_counter()
        summaries[name] = train(cfg, log=log)
        summaries[name]["wall_seconds"] = time.perf_counter() - start
    sup, mpl = summaries["supervised"], summaries["mpl"]
    rows = [
        ("labels only (student model)", None, sup["student_acc"], sup["ema_acc"], sup["wall_seconds"]),
        ("Meta Pseudo Labels", mpl["teacher_acc"], mpl["student_acc"], mpl["ema_acc"], mpl["wall_seconds"]),
    ]
    log("")
    log(f"digits, {base.num_labeled} labels, {base.steps} steps, test accuracy (%):")
    log(f"{'method':<30}{'teacher':>9}{'student':>9}{'EMA':>9}{'time':>8}")
    for name, t, s, e, sec in rows:
        t_txt = f"{t:9.2f}" if t is not None else f"{'-':>9}"
        log(f"{name:<30}{t_txt}{s:9.2f}{e:9.2f}{sec:7.0f}s")
    gain = mpl["student_acc"] - sup["student_acc"]
    log(f"MPL student vs labels-only: {gain:+.2f} points (runs in {out}/)")
    return summaries
