"""Paths as users have them (issue 29): spaces, non-ASCII names, links, read-only and full folders, a file where a
folder should be. Each works, or ends in one ``metapl: error:`` line with exit 2 and leaves nothing behind.
``benchmarks.paths_probe`` runs the same cases (and more) as separate commands and counts the clean ones."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_child import digest
from conftest import REPO, cli
from metapl.data import load_dataset
from metapl.data.sources import cache
from metapl.logs import capture

TINY = [
    *["--num-labeled", "3", "--batch-size", "2", "--mu", "1", "--workers", "0", "--val-labeled", "0"],
    *["--eval-every", "2", "--log-every", "2", "--save-every", "2", "--no-tensorboard", "--no-progress"],
    *["--device", "cpu", "--steps", "2", "--finetune-steps", "0"],
]
LEFTOVER = (".tmp-", ".trash-", ".lock-")


def load(path, cache_dir, **kw):
    with capture() as lines:
        data = load_dataset("folder", str(path), cache_dir=str(cache_dir), **kw)
    return data, lines


def decodes(lines: list[str]) -> int:
    return sum(line.startswith("decoding ") for line in lines)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(LEFTOVER)) if root.is_dir() else []


def test_spaces_and_non_ascii_in_paths_classes_and_file_names(make_tree, tmp_path):
    tree = make_tree("my data/é 中文", classes=("fourmi é", "蜜蜂", "cat"))
    os.rename(tree / "train" / "cat" / "000.png", tree / "train" / "cat" / "chat ï 猫.png")
    data, _ = load(tree, tmp_path / "cache é 中文")
    assert data.classes == ["cat", "fourmi é", "蜜蜂"] and (len(data.train), len(data.test)) == (12, 12)
    archive = tmp_path / "my data" / "données é.tar"
    shutil.make_archive(str(archive.with_suffix("")), "tar", tree)
    from_tar, _ = load(archive, tmp_path / "cache é 中文", unlabeled_dir=str(tree))
    assert digest(from_tar) == digest(data) and len(from_tar.extra_unlabeled) == 24
    streamed, _ = load(tree, tmp_path / "cache é 中文", data_path="stream", image_size=12)
    assert streamed.train.open(0).size == (12, 12) and len(streamed.train) == 12


def test_linked_data_class_folders_and_files_read_as_the_real_tree(make_tree, tmp_path):
    real = make_tree("real", splits=())
    want = digest(load(real, tmp_path / "reference")[0])
    linked = tmp_path / "linked"
    for c in ("ant", "bee", "cat"):
        (linked / "classes").mkdir(parents=True, exist_ok=True)
        (linked / "classes" / c).symlink_to(real / c, target_is_directory=True)
        (linked / "files" / c).mkdir(parents=True)
        for f in (real / c).iterdir():
            (linked / "files" / c / f.name).symlink_to(f)
    (tmp_path / "folder link").symlink_to(real, target_is_directory=True)
    for path in (tmp_path / "folder link", linked / "classes", linked / "files"):
        assert digest(load(path, tmp_path / "cache")[0]) == want, path


def test_an_edit_inside_a_linked_class_folder_builds_a_new_entry(make_tree, tmp_path):
    real, linked = make_tree("real", splits=()), tmp_path / "linked"
    linked.mkdir()
    for c in ("ant", "bee", "cat"):
        (linked / c).symlink_to(real / c, target_is_directory=True)
    _, first = load(linked, tmp_path / "cache")
    (real / "ant" / "000.png").write_bytes((real / "bee" / "000.png").read_bytes())  # another picture, same name
    second, lines = load(linked, tmp_path / "cache")
    assert decodes(first) == 1 and decodes(lines) == 1  # not the stale entry of the old pictures


def test_a_symlink_loop_is_refused_in_one_line(make_tree, tmp_path, capsys):
    tree = make_tree("tree", splits=())
    (tree / "ant" / "again").symlink_to(tree / "ant", target_is_directory=True)
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--dataset", "folder", "--data-dir", tree, *TINY, "--out", out)
    assert (code, err) == (
        2,
        f"metapl: error: {tree / 'ant' / 'again'} links to {tree / 'ant'}, a folder that holds it (a symlink loop); "
        "remove or replace the link",
    )
    assert not out.exists()


def test_a_dangling_image_link_is_an_unreadable_image(make_tree, tmp_path, capsys):
    tree = make_tree("tree", splits=())
    (tree / "ant" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    code, err = cli(capsys, "train", "--dataset", "folder", "--data-dir", tree, *TINY, "--out", tmp_path / "run")
    assert code == 2 and err.startswith("metapl: error: cannot read image ant/gone.png (FileNotFoundError: ")
    assert err.endswith("); fix or delete it, or pass --skip-corrupt") and not (tmp_path / "run").exists()
    with pytest.warns(UserWarning, match="gone.png"):
        data, lines = load(tree, tmp_path / "cache", skip_corrupt=True)
    assert len(data.train) + len(data.test) == 12 and any("skipped unreadable image ant/gone.png" in x for x in lines)


def test_file_names_that_are_not_utf8(make_tree, tmp_path):
    tree = make_tree("tree", splits=())
    os.rename(tree / "ant" / "000.png", os.fsencode(tree / "ant") + b"/\xff\xfe.png")
    data, _ = load(tree, tmp_path / "cache")
    assert len(data.train) + len(data.test) == 12
    streamed, _ = load(tree, tmp_path / "cache", data_path="stream", image_size=12)
    assert [streamed.train.open(i).size for i in range(len(streamed.train))] == [(12, 12)] * 9  # 3 held out
    Path(os.fsdecode(os.fsencode(tree / "bee") + b"/\xff.png")).write_bytes(b"not a png")
    with pytest.warns(UserWarning):
        _, lines = load(tree, tmp_path / "cache", skip_corrupt=True)
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert warning.startswith("warning: skipped unreadable image bee/\ufffd.png (UnidentifiedImageError: ")
    warning.encode("utf-8")  # printable on any UTF-8 terminal: no surrogates left


def test_fashion_mnist_idx_files_under_a_path_with_spaces(tmp_path):
    folder = tmp_path / "my data" / "fashion é"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    data = load_dataset("fashion-mnist", str(folder), cache_dir=str(tmp_path / "cache é"))
    assert (len(data.train), len(data.test)) == (30, 10)


# -- the cache folder -------------------------------------------------------------------------------------------------


def test_a_cache_folder_that_is_a_file_or_below_one_is_refused_in_one_line(make_tree, tmp_path, capsys):
    tree, blocker = make_tree(), tmp_path / "cache file"
    blocker.write_text("not a folder\n")
    data = ["--dataset", "folder", "--data-dir", tree, *TINY]
    code, err = cli(capsys, "train", *data, "--cache-dir", blocker, "--out", tmp_path / "run")
    assert (code, err) == (
        2,
        f"metapl: error: the cache folder {blocker} is a file; pass --cache-dir DIR (a folder) or set METAPL_CACHE_DIR",
    )
    code, err = cli(capsys, "train", *data, "--cache-dir", blocker / "sub", "--out", tmp_path / "run")
    assert (code, err) == (
        2,
        f"metapl: error: cannot write the data cache in {blocker / 'sub'} (Not a directory); pass --cache-dir DIR "
        "(a writable folder) or set METAPL_CACHE_DIR",
    )
    assert not (tmp_path / "run").exists() and blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (OSError("147456 requested and 65408 written"), "147456 requested and 65408 written: the disk is full"),
    ],
)
def test_a_full_cache_folder_is_refused_in_one_line_and_leaves_nothing(
    make_tree, tmp_path, capsys, monkeypatch, error, reason
):
    real, calls = np.save, []

    def full_after_the_first(path, array, **kw):  # the disk fills up in the middle of the entry
        calls.append(path)
        if len(calls) > 1:
            raise error
        return real(path, array, **kw)

    monkeypatch.setattr(cache.np, "save", full_after_the_first)
    root, out = tmp_path / "cache", tmp_path / "run"
    code, err = cli(
        capsys, "train", "--dataset", "folder", "--data-dir", make_tree(), *TINY, "--cache-dir", root, "--out", out
    )
    assert (code, err) == (
        2,
        f"metapl: error: cannot write the data cache in {root} ({reason}); free disk space, or pass --cache-dir DIR "
        "on another disk (or set METAPL_CACHE_DIR)",
    )
    assert list(root.iterdir()) == [] and not out.exists()  # no entry, no temporary folder, no lock file, no run


# -- read-only folders: real ones (a read-only bind mount in a private mount namespace as root, else chmod) ----------


@pytest.fixture
def read_only():
    """``run(argv, folders)``: ``metapl ARGV`` in a child process that sees ``folders`` read-only."""
    as_root = os.geteuid() == 0
    if as_root and (shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0):
        pytest.skip("read-only folders need a mount namespace (unshare -m) when the tests run as root")
    changed = []

    def run(argv, folders) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "metapl", *map(str, argv)]
        if as_root:
            mounts = [f"ro:{f}" for f in folders]
            cmd = ["unshare", "-m", sys.executable, "-m", "benchmarks.paths_probe", "--mount", *mounts, "--", *cmd]
        else:
            for folder in folders:
                folder.chmod(0o555)
                changed.append(folder)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    yield run
    for folder in changed:
        folder.chmod(0o755)


def test_read_only_data_and_unlabeled_folders_work(make_tree, tmp_path, read_only):
    tree, extra, out = make_tree("data"), make_tree("extra", splits=()), tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data-dir", tree, "--unlabeled-dir", extra, *TINY]
    p = read_only([*argv, "--cache-dir", tmp_path / "cache", "--out", out], [tree, extra])
    assert p.returncode == 0, p.stderr
    assert (out / "summary.json").is_file() and leftovers(tmp_path / "cache") == []


def test_a_read_only_cache_serves_its_entries_and_refuses_a_new_one(make_tree, tmp_path, read_only):
    known, new, root = make_tree("known"), make_tree("new"), tmp_path / "cache"
    load(known, root)  # the entry exists before the cache becomes read-only

    def train(tree, out):
        return read_only(
            ["train", "--dataset", "folder", "--data-dir", tree, *TINY, "--cache-dir", root, "--out", out], [root]
        )

    p = train(known, tmp_path / "run1")
    assert p.returncode == 0 and f"using cached arrays in {root}" in p.stdout, p.stderr
    p = train(new, tmp_path / "run2")
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert (p.returncode, p.stderr.strip()) == (
        2,
        f"metapl: error: cannot write the data cache in {root} ({reason}); pass --cache-dir DIR (a writable folder) "
        "or set METAPL_CACHE_DIR",
    )
    assert "decoding" not in p.stdout  # refused before decoding anything
    assert not (tmp_path / "run2").exists() and leftovers(root) == []
