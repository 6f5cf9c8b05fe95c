"""The statistics of a protocol over seeds: paired differences between two rows and their 95 % Student-t intervals,
as ``metapl compare``, ``metapl demo`` and the benchmarks report them."""

from __future__ import annotations

import statistics

# Two-sided 95 % quantiles of Student's t by degrees of freedom (seeds − 1).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


LIMIT = 100.0  # the largest difference of two accuracies, in points


def t_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (the nearest tabled df at or below)."""
    return T_975[max(k for k in T_975 if k <= df)]


def paired_interval(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean of a − b over the seeds both have, and the half-width of its 95 % t-interval.

    Args:
        a: seed -> value of one row.
        b: seed -> value of its partner.

    Returns:
        (mean difference, half-width, number of paired seeds), or None below 2 paired seeds.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    half = t_975(len(seeds) - 1) * statistics.stdev(diffs) / len(seeds) ** 0.5
    return statistics.mean(diffs), half, len(seeds)


def mean_sd(values: list[float]) -> str:
    """``"mean ± sd"`` with two decimals (sd 0 for one value; "–" for none)."""
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def interval_bounds(stats: tuple[float, float, int], limit: float = LIMIT) -> tuple[float, float]:
    """The 95 % interval of ``paired_interval``'s ``stats``, clipped to [-``limit``, +``limit``]: a difference of two
    accuracies in % lies there, however wide few seeds make the t-interval."""
    mean, half, _ = stats
    return max(mean - half, -limit), min(mean + half, limit)


def identical(stats: tuple[float, float, int]) -> bool:
    """Whether every seed's difference was the same (the t-interval has width 0, up to float rounding)."""
    return stats[1] < 1e-9


def interval_text(stats: tuple[float, float, int] | None, single: float | None = None) -> str:
    """``"+1.20 [-0.30, +2.70]"`` (clipped to ±100 points); ``"+2.00 (the same in all 3 seeds)"`` when every seed's
    difference is the same (a t-interval of width 0 says nothing about another seed); with one paired seed (``stats``
    None) ``"+1.20 (one seed)"``; "–" for neither."""
    if stats is not None:
        mean, _, n = stats
        if identical(stats):
            return f"{mean:+.2f} (the same in all {n} seeds)"
        low, high = interval_bounds(stats)
        return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
    return "–" if single is None else f"{single:+.2f} (one seed)"


def paired_text(a: dict[int, float], b: dict[int, float]) -> str:
    """The paired difference a − b as ``interval_text`` shows it (one seed: that seed's difference)."""
    stats = paired_interval(a, b)
    common = sorted(set(a) & set(b))
    return interval_text(stats, a[common[0]] - b[common[0]] if len(common) == 1 else None)
