"""``metapl demo``'s wall time on an idle machine and beside one other CPU-bound process, for two CPU policies.

* ``auto``: loader workers and intra-op threads chosen from the free cores (``metapl.training.process.plan_cpu_share``);
* ``fixed``: 2 workers and 2 threads whatever the load (what the demo did before the policy).

Each measurement is a fresh process (the free-core measurement is cached per process); the "busy" one starts a
Python busy loop first and stops it after. Issue target: busy ≤ 2 × idle with ``auto``. Needs an otherwise quiet
machine.

    python -m benchmarks.busy_share                      # 4 demos, ~5 min on 2 cores
    python -m benchmarks.busy_share --steps 10 --conditions idle-auto     # smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import REPO, child_env

POLICIES = {"auto": (None, None), "fixed": (2, 2)}
CONDITIONS = ("idle-auto", "busy-auto", "busy-fixed", "idle-fixed")


def time_demo(policy: str, busy: bool, steps: int | None, out: str) -> float:
    """Wall seconds of one ``metapl demo`` in a fresh process, with or without a busy loop beside it."""
    workers, threads = POLICIES[policy]
    code = (
        "from dataclasses import replace; from metapl.commands import demo as d; "
        f"d.DEMO = replace(d.DEMO, workers={workers}, threads={threads}); "
        f"d.demo(out={out!r}, steps={steps})"
    )
    env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}  # the policy decides the threads
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(2)  # let the free-core measurement see it
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
        return time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma list of {', '.join(CONDITIONS)}")
    p.add_argument("--steps", type=int, default=None, help="MPL steps per demo run (default: the demo's)")
    args = p.parse_args(argv)
    conditions = args.conditions.split(",")
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        p.error(f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for condition in conditions:
            load, policy = condition.split("-")
            seconds[condition] = time_demo(policy, load == "busy", args.steps, os.path.join(tmp, condition))
            print(f"{condition}: {seconds[condition]:.1f} s", flush=True)
    for policy in POLICIES:
        if f"idle-{policy}" in seconds and f"busy-{policy}" in seconds:
            ratio = seconds[f"busy-{policy}"] / seconds[f"idle-{policy}"]
            print(f"{policy}: busy / idle = {ratio:.2f} (target ≤ 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
