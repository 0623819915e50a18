"""write_snapshot killed (SIGKILL) at every file-system step: the last good snapshot stays.

A child process writes a snapshot with ``os.rename``, ``os.replace``, ``os.fsync``,
``os.unlink``, ``os.rmdir`` and ``shutil.rmtree`` wrapped by the test's own script, so that
the ``i``-th of those calls kills the process before it happens. The product code has no hook
for this.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.index import VectorIndex, current_snapshot, read_snapshot, write_snapshot

ROOT = Path(__file__).resolve().parents[2]

CHILD = r'''
import json, os, shutil, signal, sys
from pathlib import Path

import numpy as np

from indexer.index import VectorIndex, write_snapshot

root, kill_at, generation = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
trace = []


def wrap(owner, name):
    real = getattr(owner, name)

    def step(*args, **kwargs):
        trace.append([name, *(os.path.basename(str(a)) for a in args)])
        if len(trace) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, step)


index = VectorIndex(4)
index.upsert([f"g{generation}"], np.full((1, 4), generation, np.float32),
             [{"generation": generation}])


def write(d):
    index.write(d)
    (d / "extra.json").write_text(json.dumps({"generation": generation}))


for owner, name in ((os, "rename"), (os, "replace"), (os, "fsync"), (os, "unlink"),
                    (os, "rmdir"), (shutil, "rmtree")):
    wrap(owner, name)
write_snapshot(root, write)
print(json.dumps(trace))
'''


def write_generation(root: Path, generation: int) -> Path:
    index = VectorIndex(4)
    index.upsert([f"g{generation}"], np.full((1, 4), generation, np.float32),
                 [{"generation": generation}])

    def write(d: Path) -> None:
        index.write(d)
        (d / "extra.json").write_text(json.dumps({"generation": generation}))

    final = write_snapshot(root, write)
    assert final is not None
    return final


def run_child(script: Path, root: Path, kill_at: int, generation: int):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), str(root), str(kill_at), str(generation)],
                          capture_output=True, text=True, env=env, timeout=120)


def loaded_generation(root: Path) -> int:
    found = read_snapshot(root)
    assert found is not None, "no readable snapshot"
    snap, extra = found
    index = VectorIndex.read(snap)
    assert index.ids() == [f"g{extra['generation']}"]
    assert index.payload(f"g{extra['generation']}") == {"generation": extra["generation"]}
    return int(extra["generation"])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_kill_at_any_step_leaves_the_last_snapshot_and_the_next_write_works(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = tmp_path / "index"
    write_generation(root, 0)

    dry = run_child(script, root, 0, 1)  # no kill: the steps of one write, in order
    assert dry.returncode == 0, dry.stderr
    trace = json.loads(dry.stdout)
    assert loaded_generation(root) == 1
    published = next(i for i, call in enumerate(trace, 1)
                     if call[0] == "replace" and call[-1] == "CURRENT")
    assert any(c[0] == "rmtree" for c in trace[published:])  # the old one is removed after
    generation = 1
    for kill_at in range(1, len(trace) + 1):
        before = generation
        child = run_child(script, root, kill_at, before + 1)
        assert child.returncode == -signal.SIGKILL, (kill_at, child.stderr)
        # the new snapshot counts from the atomic pointer replace on, never before
        expected = before + 1 if kill_at > published else before
        assert loaded_generation(root) == expected, f"killed at {trace[kill_at - 1]}"
        generation = expected + 1
        # the killed writer's unfinished folder: kept while it could be another live
        # writer's, removed once it is old (made old here rather than waited for)
        for p in root.glob(".tmp-*"):
            os.utime(p, (time.time() - 7200, time.time() - 7200))
        final = write_generation(root, generation)
        assert current_snapshot(root) == final and loaded_generation(root) == generation
        # whatever the killed writer left behind is gone once a write succeeded
        assert sorted(p.name for p in root.iterdir() if p.name != ".publish.lock") == sorted(
            [final.name, "CURRENT"])


def test_a_snapshot_refused_by_its_guard_changes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two writers (one whose lease expired): the one holding less must not publish."""
    root = tmp_path / "index"
    first = write_generation(root, 5)
    seen: list[Path | None] = []

    def holds_more(current: Path | None) -> bool:
        seen.append(current)
        return loaded_generation(root) < 3  # we would publish generation 3: older

    assert write_snapshot(root, lambda d: None, holds_more) is None
    assert seen == [first] and current_snapshot(root) == first
    assert loaded_generation(root) == 5
    assert not list(root.glob(".tmp-*"))  # the refused folder is gone
