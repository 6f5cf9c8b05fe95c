"""Is a model's test accuracy held back by BatchNorm statistics gathered on augmented views?

Evaluates the final models of a run on the test set twice: as trained, and after re-estimating every BatchNorm
layer's running mean and variance on clean (unaugmented) training images — a cumulative average over
``--batches`` batches, weights untouched. A large gain would mean the strong views' statistics, not the weights,
cost the accuracy (benchmarks/README.md, 3.2):

    python -m benchmarks.bn_recalibrate runs/sweep/cifar10-lstrong-4k/randaug-labels-only/seed0 --roles student
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metapl import data as mdata
from metapl.rundir.checkpoint import load_checkpoint
from metapl.rundir.layout import load_run_config
from metapl.rundir.rebuild import build_model
from metapl.training.evaluation import evaluate


def accuracy(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode over ``loader``'s (images, labels) batches, on the CPU."""
    return evaluate({"model": model}, loader, torch.device("cpu"))["model_acc"]


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, loader, batches: int) -> None:
    """Replace every BatchNorm layer's running statistics by their cumulative average over ``batches`` batches."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for i, (images, *_) in enumerate(loader):
        if i == batches:
            break
        model(images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished metapl train run folder (checkpoint.pt, config.yaml)")
    p.add_argument("--roles", default="student", help="comma list of teacher, student, ema")
    p.add_argument("--batches", type=int, default=60, help="clean training batches of 128 for the statistics")
    args = p.parse_args(argv)
    run = Path(args.run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    cfg = load_run_config(run)  # the run's config, through the config layer and its checks
    data = mdata.load_dataset(
        cfg.dataset, cfg.data_dir, image_size=cfg.image_size, cache_dir=cfg.cache_dir, seed=cfg.seed
    )
    test = mdata.make_eval_loader(data.test, mean=ckpt["mean"], std=ckpt["std"], batch_size=500, num_workers=0)
    # Shuffled: training images may be stored class by class (the CIFAR-10 JPEG tar is).
    clean = mdata.EvalDataset(data.train, mdata.eval_transform(ckpt["mean"], ckpt["std"]))
    train = torch.utils.data.DataLoader(clean, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    for role in args.roles.split(","):
        model = build_model(ckpt, role)
        before = accuracy(model, test)
        reestimate_batchnorm(model, train, args.batches)
        print(
            f"{role}: test accuracy as trained {before:.2f} %, BatchNorm re-estimated on clean training images "
            f"{accuracy(model, test):.2f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
