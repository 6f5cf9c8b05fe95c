"""One run's data loading, as a separate process (a helper of test_cache_concurrency.py).

Usage: ``python tests/cache_child.py TREE CACHE LOG [--go FILE] [--slow-build S] [--stall-write S]``. Loads the image
folder ``TREE`` with ``load_dataset("folder", ...)`` into the cache ``CACHE``, appending every line it logs to ``LOG``
(flushed at once, so that the test can follow it), then ``digest <sha256>`` of the arrays it read and ``done``.

* ``--go FILE``: write ``ready`` to the log, then wait until ``FILE`` exists (the test starts its processes together);
* ``--slow-build S``: the decoding step logs ``building`` and sleeps S seconds first (a build that takes a while);
* ``--stall-write S``: after the cache entry's first array file is written, log ``writing`` and sleep S seconds (a
  process killed in the middle of writing an entry).

The slowness is plugged in here, around the package's functions; nothing in the package is changed for the test.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np

from metapl.data import load_dataset
from metapl.data.sources import cache, folder
from metapl.logs import LineFormatter


def digest(data) -> str:
    """SHA-256 over the train and test images and labels, as read."""
    h = hashlib.sha256()
    for store in (data.train, data.test):
        for array in (store.images, store.labels):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("tree")
    p.add_argument("cache")
    p.add_argument("log")
    p.add_argument("--go")
    p.add_argument("--slow-build", type=float, default=0.0)
    p.add_argument("--stall-write", type=float, default=0.0)
    args = p.parse_args(argv)
    out = open(args.log, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    def log(line: str) -> None:
        out.write(line + "\n")

    if args.slow_build:
        decode = folder.decode_tree

        def slow_decode(*a, **k):
            log("building")
            time.sleep(args.slow_build)
            return decode(*a, **k)

        folder.decode_tree = slow_decode
    if args.stall_write:
        summary = cache._file_summary

        def stalled_summary(path):
            log("writing")
            time.sleep(args.stall_write)
            return summary(path)

        cache._file_summary = stalled_summary
    if args.go:
        log("ready")
        while not Path(args.go).exists():
            time.sleep(0.02)
    # metapl's lines go to the log file as they come (the parent waits for "waiting for ..." while this one waits).
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter())
    logging.getLogger("metapl").addHandler(handler)
    logging.getLogger("metapl").setLevel(logging.INFO)
    data = load_dataset("folder", args.tree, cache_dir=args.cache)
    log(f"digest {digest(data)}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
