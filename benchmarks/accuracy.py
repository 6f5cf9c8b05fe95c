"""Accuracy at a fixed budget on real data: labels only vs UDA distillation vs the MPL variants, several seeds.

Each (protocol, method, seed) is one ``metapl train`` run in ``--root``; a finished run is skipped, so the table can
be built in pieces (one method x one seed per command) and resumed. ``--report`` aggregates the summaries into a
Markdown table (mean ± std over seeds) and a PNG of the EMA student's test accuracy over steps.

    python benchmarks/accuracy.py --protocol fashion --methods all --seeds 0,1,2
    python benchmarks/accuracy.py --protocol fashion --report

``--finetune-steps N`` adds the paper's last phase: every pseudo-label student is then finetuned on the labeled
images for N steps (same batch size), and the labels-only model trains N steps longer, so every method gets the same
number of optimizer steps; these runs go to ``ROOT/PROTOCOL-ftN`` and ``--report`` gains a finetuned column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# The same models, budget, split (seeded) and optimiser for every method of a protocol; only the MPL knobs differ.
PROTOCOLS = {
    "fashion": dict(
        dataset="fashion-mnist", data_dir=str(SHARED / "fashion-mnist"), num_labeled=1000, teacher="small_cnn",
        student="small_cnn", steps=400, batch_size=16, mu=4, t_lr=0.05, s_lr=0.05, s_wait_steps=50,
        s_warmup_steps=50, t_warmup_steps=50, uda_weight=1.0, uda_steps=200, randaug_m=9, ema=0.99,
        eval_every=100, save_every=400, log_every=25, workers=1, label_smoothing=0.1,
    ),
    "cifar10": dict(
        dataset="cifar10", data_dir=str(SHARED / "cifar10-jpeg.tar.gz"), num_labeled=4000, teacher="small_cnn",
        student="small_cnn", steps=400, batch_size=16, mu=4, t_lr=0.05, s_lr=0.05, s_wait_steps=50,
        s_warmup_steps=50, t_warmup_steps=50, uda_weight=1.0, uda_steps=200, randaug_m=10, ema=0.99,
        eval_every=100, save_every=400, log_every=25, workers=1, label_smoothing=0.1,
    ),
}  # fmt: skip

METHODS = {
    "labels-only": dict(method="supervised"),
    "uda-distill": dict(mpl_weight=0.0),
    "mpl-taylor": dict(feedback="taylor", feedback_sign="derived"),
    "mpl-taylor-reversed": dict(feedback="taylor", feedback_sign="reversed"),
    "mpl-dot": dict(feedback="dot", feedback_sign="derived"),
    "mpl-soft": dict(mode="soft"),
}


def run_dir(root: Path, protocol: str, finetune_steps: int) -> Path:
    """Where a protocol's runs go: ``ROOT/PROTOCOL``, or ``ROOT/PROTOCOL-ftN`` with N finetuning steps."""
    return root / (f"{protocol}-ft{finetune_steps}" if finetune_steps else protocol)


def run_one(
    root: Path, protocol: str, method: str, seed: int, *, steps: int | None, cache_dir: str | None,
    finetune_steps: int = 0,
) -> dict:  # fmt: skip
    """Train one (protocol, method, seed) unless its summary exists; return the summary."""
    from metapl.config import TrainConfig
    from metapl.train import train

    out = run_dir(root, protocol, finetune_steps) / method / f"seed{seed}"
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    if out.exists():  # a killed run: start it again from scratch (runs are short)
        import shutil

        shutil.rmtree(out)
    values = {**PROTOCOLS[protocol], **METHODS[method], "seed": seed, "out": str(out), "progress": False,
              "tensorboard": False, "device": "cpu", "cache_dir": cache_dir}  # fmt: skip
    cfg = TrainConfig(**values)
    if steps:
        cfg = replace(cfg, steps=steps, eval_every=max(1, steps // 6), save_every=steps, log_every=max(1, steps // 6))
    if finetune_steps and cfg.method == "supervised":  # the same number of optimizer steps as MPL + finetuning
        cfg = replace(cfg, steps=cfg.steps + finetune_steps, save_every=cfg.steps + finetune_steps)
    elif finetune_steps:
        cfg = replace(cfg, finetune_steps=finetune_steps, finetune_batch_size=cfg.batch_size)
    start = time.perf_counter()
    summary = train(cfg, log=lambda *a, **k: None)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    finetuned = f" finetuned {summary['finetuned_acc']:.2f}" if summary.get("finetuned_acc") is not None else ""
    print(f"{protocol} {method} seed {seed}: student {summary['student_acc']:.2f} ema {summary['ema_acc']:.2f}"
          f"{finetuned} ({summary['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
    return summary


def report(root: Path, protocol: str, png: Path | None, finetune_steps: int = 0) -> str:
    """Markdown table of mean ± std per method, and optionally a PNG of EMA accuracy over steps."""
    from metapl.metrics import read_metrics

    finetuned_header = " finetuned student acc (%) |" if finetune_steps else ""
    lines = [
        f"| method | runs | student acc (%) | EMA student acc (%) |{finetuned_header} teacher acc (%) | "
        "wall time / run (s) |",
        "|---|---|---|---|---|---|" + ("---|" if finetune_steps else ""),
    ]
    curves = {}
    for method in METHODS:
        summaries, histories = [], []
        for summary_path in sorted((run_dir(root, protocol, finetune_steps) / method).glob("seed*/summary.json")):
            summaries.append(json.loads(summary_path.read_text()))
            histories.append([(r["step"], r["eval/ema_acc"]) for r in read_metrics(summary_path.parent)
                              if r.get("eval/ema_acc") is not None])  # fmt: skip
        if not summaries:
            continue
        curves[method] = histories

        def stat(key, summaries=summaries):
            vals = [s[key] for s in summaries if s.get(key) is not None]
            if not vals:
                return "–"
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.2f} ± {sd:.2f}"

        wall = statistics.mean(s.get("wall_seconds", s["seconds"]) for s in summaries)
        finetuned = f" {stat('finetuned_acc')} |" if finetune_steps else ""
        lines.append(f"| {method} | {len(summaries)} | {stat('student_acc')} | {stat('ema_acc')} |{finetuned} "
                     f"{stat('teacher_acc')} | {wall:.0f} |")  # fmt: skip
    if png is not None and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (method, histories) in enumerate(curves.items()):
            steps = [s for s, _ in histories[0]]
            n = min(len(h) for h in histories)
            mean = [statistics.mean(h[j][1] for h in histories) for j in range(n)]
            ax.plot(steps[:n], mean, marker="o", ms=3, label=method, color=f"C{i}")
        ax.set_xlabel("step")
        ax.set_ylabel("EMA student test accuracy (%)")
        ax.set_title(f"{protocol}: EMA student accuracy over steps (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)}, or all")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--root", default="runs/accuracy", help="where the runs go")
    p.add_argument("--steps", type=int, default=None, help="override the protocol's step budget (smoke tests)")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: metapl's)")
    p.add_argument("--report", action="store_true", help="aggregate the finished runs instead of training")
    p.add_argument("--png", default=None, help="with --report: write the accuracy plot here")
    p.add_argument("--finetune-steps", type=int, default=0, help="finetune pseudo-label students N steps on labels")
    args = p.parse_args(argv)
    if args.finetune_steps < 0:
        p.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    root = Path(args.root)
    if args.report:
        print(report(root, args.protocol, Path(args.png) if args.png else None, args.finetune_steps))
        return 0
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in methods:
            run_one(root, args.protocol, method, seed, steps=args.steps, cache_dir=args.cache_dir,
                    finetune_steps=args.finetune_steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
