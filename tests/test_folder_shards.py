"""A folder's shards (`sources.folder`): edits stay local, names are stable, every file is in one shard."""

from __future__ import annotations

import random
from pathlib import Path

from cnncodes.folders import FolderLayout, ImageFile
from cnncodes.sources.folder import MAX_RUN, FolderSource, cut


def _layout(files: list[ImageFile]) -> FolderLayout:
    return FolderLayout(Path("/data"), ["a", "b"], {"train": files})


def _files(names: list[str], label: int = 0) -> list[ImageFile]:
    return [ImageFile(n, label, 100, 1) for n in sorted(names)]


def _signatures(files: list[ImageFile], size: int) -> dict[str, tuple]:
    """Output shard name -> the input's signature (what decides whether it is redone)."""
    shards = FolderSource(_layout(files), size).shards()["train"]
    return {s.name: (s.size, s.mtime_ns, s.digest) for s in shards}


def _redone(before: dict, after: dict) -> int:
    """Shards a rerun extracts: new names, or a known name whose signature changed."""
    return sum(1 for k, v in after.items() if before.get(k) != v)


def test_every_file_lands_in_exactly_one_shard_in_order_and_classes_never_share_one():
    files = _files([f"a/{i:05d}.jpg" for i in range(3000)]) + _files([f"b/{i:05d}.jpg" for i in range(700)], 1)
    runs = cut(files, 100)
    assert [f for run in runs for f in run] == files
    assert all(len({f.path.split("/")[0] for f in run}) == 1 for run in runs)
    assert max(len(run) for run in runs) <= MAX_RUN * 100
    mean = len(files) / len(runs)
    assert 50 < mean < 150, mean  # about the shard size
    names = [s.name for s in FolderSource(_layout(files), 100).shards()["train"]]
    assert len(set(names)) == len(names)


def test_adding_ten_adjacent_images_to_a_class_redoes_at_most_two_shards():
    base = [f"a/img_{i:06d}.jpg" for i in range(0, 20000, 2)]  # 10,000 files, gaps to insert into
    before = _signatures(_files(base), 1000)
    rng = random.Random(0)
    for _ in range(20):
        start = rng.randrange(0, 20000 - 40, 2)
        added = [f"a/img_{start + 2 * k + 1:06d}.jpg" for k in range(10)]  # between existing names
        assert _redone(before, _signatures(_files(base + added), 1000)) <= 2
    appended = [f"a/img_{20000 + k:06d}.jpg" for k in range(10)]  # new photos sort last: the last shard
    assert _redone(before, _signatures(_files(base + appended), 1000)) == 1


def test_removing_or_changing_a_few_images_redoes_only_their_shards():
    base = _files([f"a/{i:06d}.jpg" for i in range(10000)])
    before = _signatures(base, 1000)
    gone = set(random.Random(1).sample(range(10000), 3))
    after = _signatures([f for i, f in enumerate(base) if i not in gone], 1000)
    assert _redone(before, after) <= 3
    touched = [ImageFile(f.path, f.label, f.size, 2 if i == 5000 else f.mtime_ns) for i, f in enumerate(base)]
    assert _redone(before, _signatures(touched, 1000)) == 1


def test_a_folder_is_listed_in_path_order_with_nested_folders_and_odd_files(tmp_path):
    """The listing (strings, not a Path per file: 10^5 files on every no-op rerun) keeps the order paths
    sort in, by their parts: `sub/` before `sub-c/` and `sub.b/` (as strings, "sub-c/" would sort first,
    and every shard of a store written before would be redone); odd files are reported, not listed."""
    from cnncodes.folders import discover, image_files

    for rel in ("c/sub/x.jpg", "c/sub-c/y.JPG", "c/sub.b/z.png", "c/a.jpg", "c/notes.txt", "c/.hidden.jpg", "d/b.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "c" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "c" / "sub" / "loop").symlink_to(tmp_path / "c")
    layout = discover(tmp_path)
    assert [f.path for f in layout.splits["train"]] == ["c/a.jpg", "c/sub/x.jpg", "c/sub-c/y.JPG", "c/sub.b/z.png",
                                                        "d/b.jpeg"]
    assert sorted(layout.ignored["train"]) == [("c/gone.jpg", "broken symlink or symlink loop"),
                                               ("c/notes.txt", "not an image (unsupported extension '.txt')"),
                                               ("c/sub/loop", "symlink loop, not followed")]
    ignored: list = []
    assert image_files(tmp_path / "c", ignored, tmp_path / "c") == [
        tmp_path / "c" / p for p in ("a.jpg", "sub/x.jpg", "sub-c/y.JPG", "sub.b/z.png")]
