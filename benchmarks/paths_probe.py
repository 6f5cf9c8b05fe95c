"""A probe of paths as users have them (issue 29): spaces, non-ASCII names, links, read-only and full folders, for the
data, the decode cache, the extra unlabeled images and the run folder. Not a test: it counts the clean cases, before
and after a change (``--src`` runs another checkout's ``src``).

Each case runs ``metapl train`` (a tiny run) in a child process. A case is clean when the run works (exit 0, the
expected number of images, no leftovers in the cache) or, where it cannot, ends in one ``metapl: error:`` line with
exit 2 and leaves nothing behind (no run folder, no cache entry, no temporary folder or lock file). Read-only and full
folders are real: a read-only bind mount and a small tmpfs in a private mount namespace (``unshare -m``, as root), or
``chmod`` for another user; a case that can have neither is skipped.

    python -m benchmarks.paths_probe [--only NAME,...] [--src DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # benchmarks.harness is imported where needed: --mount must start fast
TINY = [
    *["--num-labeled", "4", "--batch-size", "2", "--mu", "1", "--workers", "0", "--val-labeled", "0"],
    *["--eval-every", "2", "--log-every", "2", "--save-every", "2", "--no-tensorboard", "--no-progress"],
    *["--device", "cpu", "--steps", "2", "--finetune-steps", "0"],
]
PER_CLASS = 6
SUMMARY = re.compile(r"^[\w-]+: (\d+) train / (\d+) test images", re.M)
LEFTOVER = (".tmp-", ".trash-", ".lock-")


def image_tree(root: Path, classes=("ant", "bee"), stem: str = "img", size: int = 12) -> Path:
    """``root/<class>/<stem><i>.png``: PER_CLASS flat images per class, ``size`` pixels square."""
    from PIL import Image

    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            pixels = np.full((size, size, 3), 30 + 60 * label + i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{stem}{i}.png")
    return root


def pack(tree: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tf:
        tf.add(tree, arcname=".")
    return out


class Probe:
    """Runs the cases in one scratch folder, with one child command per run."""

    def __init__(self, tmp: Path, src: Path) -> None:
        self.tmp, self.src, self.count = tmp, src, 0
        self.can_mount = os.geteuid() == 0 and shutil.which("unshare") is not None

    def train(self, data: list, *, cache: Path | None = None, out: Path | None = None, mounts=(), env=None):
        """``metapl train TINY DATA``; ``mounts``: ``("ro", path)`` / ``("tmpfs", path)`` made for this run only."""
        self.count += 1
        out = out or self.tmp / f"run{self.count}"
        cache = cache or self.tmp / "cache"
        cmd = [sys.executable, "-m", "metapl", "train", *TINY, *map(str, data), "--out", str(out)]
        cmd += [] if "METAPL_CACHE_DIR" in (env or {}) else ["--cache-dir", str(cache)]
        if mounts and self.can_mount:
            spec = [f"{kind}:{path}" for kind, path in mounts]
            cmd = ["unshare", "-m", sys.executable, "-m", "benchmarks.paths_probe", "--mount", *spec, "--", *cmd]
        elif mounts:  # another user: chmod is real for it
            for _, path in mounts:
                Path(path).chmod(0o555)
        child = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(self.src), str(REPO)])}
        child["OMP_NUM_THREADS"] = "1"
        try:
            run = subprocess.run(cmd, cwd=self.tmp, env=child, capture_output=True, text=True, errors="replace")
            return run, out
        finally:
            for _, path in mounts if not self.can_mount else ():
                Path(path).chmod(0o755)

    def verdict(self, run, cache: Path, expect: str, images: int | None = None) -> tuple[bool, str]:
        """Clean as the module docstring says; ``expect``: ``work``, ``refuse`` or ``either``."""
        p, out = run
        err = p.stderr.strip().splitlines()
        left = [e.name for e in cache.iterdir() if e.name.startswith(LEFTOVER)] if cache.is_dir() else []
        found = SUMMARY.search(p.stdout)
        count = int(found.group(1)) + int(found.group(2)) if found else None
        worked = p.returncode == 0 and (images is None or count == images) and not left
        refused = p.returncode == 2 and len(err) == 1 and err[0].startswith("metapl: error:") and not left
        refused = refused and not (out.exists() and any(out.iterdir()))
        note = f"exit {p.returncode}" + (f", {count} images" if count is not None else "")
        note += f": {err[-1][:150]}" if err and p.returncode else ""
        note += f" (left in the cache: {left})" if left else ""
        clean = {"work": worked, "refuse": refused, "either": worked or refused}[expect]
        return clean, note


def cases(pr: Probe) -> dict:
    """name -> a function of no arguments returning ``(clean, note)`` (None: skipped); the data is made first."""
    t, n, folder = pr.tmp, 2 * PER_CLASS, ["--dataset", "folder", "--data-dir"]

    def work(data, images=n, cache=None, **kw):
        cache = cache or t / "cache"
        return lambda: pr.verdict(pr.train(data, cache=cache, **kw), cache, "work", images)

    def refuse(data, cache=None, **kw):
        cache = cache or t / "cache"
        return lambda: pr.verdict(pr.train(data, cache=cache, **kw), cache, "refuse")

    odd = image_tree(t / "my data" / "é 中文", ("fourmi é", "蜜蜂"), "ï")
    plain, tar = image_tree(t / "plain"), pack(odd, t / "my data" / "données é.tar")
    real = image_tree(t / "real")
    (t / "linked classes").mkdir()
    (t / "linked files" / "ant").mkdir(parents=True)
    (t / "linked files" / "bee").mkdir()
    for c in ("ant", "bee"):
        _link(real / c, t / "linked classes" / c)
        for f in (real / c).iterdir():
            _link(f, t / "linked files" / c / f.name)
    dangling = Path(shutil.copytree(t / "linked files", t / "dangling", symlinks=True))
    (dangling / "ant" / "gone.png").symlink_to(t / "nowhere.png")
    loop = image_tree(t / "loop")
    _link(loop / "ant", loop / "ant" / "again")
    renamed, unreadable = image_tree(t / "bytes"), image_tree(t / "bytes corrupt")
    os.rename(renamed / "ant" / "img0.png", os.fsencode(renamed / "ant") + b"/\xff\xfe.png")
    Path(os.fsdecode(os.fsencode(unreadable / "ant") + b"/\xff\xfe.png")).write_bytes(b"not a png")
    ro_data, ro_tar, ro_extra = image_tree(t / "ro data"), _dir(t / "ro tar"), image_tree(t / "ro extra")
    pack(odd, ro_tar / "a.tar")
    ro_cache, ro_env, ro_runs, small = _dir(t / "ro cache"), _dir(t / "env ro"), _dir(t / "ro runs"), _dir(t / "small")
    big = image_tree(t / "big", size=64)  # 12 x 64 x 64 x 3 bytes decoded: more than the 64 KiB disk holds
    cache_file = _file(t / "cache file")

    def filled_ro_cache():
        filled = t / "filled cache"
        pr.train([*folder, plain], cache=filled)  # the entry is made first, then the cache is read-only
        return pr.verdict(pr.train([*folder, plain], cache=filled, mounts=[("ro", filled)]), filled, "work", n)

    def fashion(link: bool):
        from benchmarks.harness import data_path

        src = data_path("fashion-mnist")
        if not (src / "train-images-idx3-ubyte.gz").is_file():
            return None
        dest = t / "fashion data" / "é 中文"
        if not dest.exists():
            dest.mkdir(parents=True)
            for f in src.glob("*.gz"):
                shutil.copy(f, dest / f.name)
        where = _link(dest, t / "fashion link") if link else dest
        return work(["--dataset", "fashion-mnist", "--data-dir", where, "--num-labeled", "10"], images=70_000)()

    return {
        "folder: spaces and é 中文 in path, classes, files": work([*folder, odd]),
        "folder: --data-dir is a symlink": work([*folder, _link(plain, t / "plain link")]),
        "folder: class folders are symlinks": work([*folder, t / "linked classes"]),
        "folder: image files are symlinks": work([*folder, t / "linked files"]),
        "folder: a dangling image symlink": refuse([*folder, dangling]),
        "folder: a dangling image symlink, --skip-corrupt": work([*folder, dangling, "--skip-corrupt"]),
        "folder: a symlink loop": refuse([*folder, loop]),
        "folder: a file name that is not UTF-8": work([*folder, renamed]),
        "folder: an unreadable non-UTF-8 file, --skip-corrupt": work(
            [*folder, unreadable, "--skip-corrupt"],
            env={"PYTHONIOENCODING": "utf-8:strict"},  # a UTF-8 terminal
        ),
        "folder --data-path stream: the same": work(
            [*folder, unreadable, "--skip-corrupt", "--data-path", "stream", "--image-size", "12"],
            env={"PYTHONIOENCODING": "utf-8:strict"},
        ),
        "folder: read-only data folder": work([*folder, ro_data], mounts=[("ro", ro_data)]),
        "folder --data-path stream: é 中文 path": work([*folder, odd, "--data-path", "stream", "--image-size", "12"]),
        "tar: spaces and é 中文 in its path and members": work([*folder, tar]),
        "tar: a symlink to the archive": work([*folder, _link(tar, t / "archive link.tar")]),
        "tar: in a read-only folder": work([*folder, ro_tar / "a.tar"], mounts=[("ro", ro_tar)]),
        "cache: spaces and é 中文 in its path": work([*folder, plain], cache=t / "cache é 中文"),
        "cache: read-only, entry missing": refuse([*folder, plain], cache=ro_cache, mounts=[("ro", ro_cache)]),
        "cache: read-only, entry present": filled_ro_cache,
        "cache: full (a 64 KiB tmpfs)": refuse([*folder, big], cache=small, mounts=[("tmpfs", small)]),
        "cache: --cache-dir is a file": refuse([*folder, plain], cache=cache_file),
        "cache: --cache-dir is below a file": refuse([*folder, plain], cache=cache_file / "sub"),
        "cache: METAPL_CACHE_DIR read-only": refuse(
            [*folder, plain], cache=ro_env / "c", mounts=[("ro", ro_env)], env={"METAPL_CACHE_DIR": str(ro_env / "c")}
        ),
        "fashion-mnist: IDX files under spaces and é 中文": lambda: fashion(False),
        "fashion-mnist: IDX folder is a symlink": lambda: fashion(True),
        "--unlabeled-dir: spaces and é 中文": work([*folder, plain, "--unlabeled-dir", odd]),
        "--unlabeled-dir: a tar with é 中文 members": work([*folder, plain, "--unlabeled-dir", tar]),
        "--unlabeled-dir: a symlink, read-only": work(
            [*folder, plain, "--unlabeled-dir", _link(ro_extra, t / "extra link")], mounts=[("ro", ro_extra)]
        ),
        "--out: spaces and é 中文": work([*folder, plain], out=t / "runs é" / "run 中文"),
        "--out: in a read-only folder": refuse([*folder, plain], out=ro_runs / "run", mounts=[("ro", ro_runs)]),
    }


def _link(target: Path, link: Path) -> Path:
    if not link.is_symlink():
        link.symlink_to(target, target_is_directory=target.is_dir())
    return link


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _file(path: Path) -> Path:
    if not path.exists():
        path.write_text("not a folder\n")
    return path


def mount_then_exec(argv: list[str]) -> None:
    """Inside ``unshare -m``: make each ``ro:PATH`` a read-only bind mount and each ``tmpfs:PATH`` a 64 KiB tmpfs,
    then run the command after ``--`` (the mounts vanish with the namespace)."""
    split = argv.index("--")
    for spec in argv[:split]:
        kind, path = spec.split(":", 1)
        if kind == "ro":
            subprocess.run(["mount", "--bind", "-o", "ro", path, path], check=True)
        else:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path], check=True)
    os.execvp(argv[split + 1], argv[split + 1 :])


def main(argv: list[str] | None = None) -> dict:
    """Run the cases (``--only``: some of them) and print one line each and the count of clean ones."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mount"]:
        mount_then_exec(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated case names (substrings)")
    p.add_argument("--src", default=str(REPO / "src"), help="the metapl source folder to probe")
    p.add_argument("--json", default=None, help="write the results here (with the stamp)")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="paths probe é ") as tmp:
        probe = Probe(Path(tmp), Path(args.src).resolve())
        for name, case in cases(probe).items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            outcome = case()
            results[name] = {"clean": None, "note": "skipped (no data)"} if outcome is None else None
            if outcome is not None:
                results[name] = {"clean": outcome[0], "note": outcome[1]}
            clean = results[name]["clean"]
            print(f"{'skip ' if clean is None else 'clean' if clean else 'DIRTY'}  {name:52s} {results[name]['note']}")
    counted = [r["clean"] for r in results.values() if r["clean"] is not None]
    print(f"clean: {sum(counted)} of {len(counted)}")
    if args.json:
        from benchmarks.harness import record

        record(args.json, {"src": args.src, "clean": sum(counted), "cases": len(counted), "results": results})
    return results


if __name__ == "__main__":
    main()
