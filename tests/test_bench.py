"""bench/run works end to end (tiny counts and outputs, one CPython's memory: 11 s; no
timing is asserted)."""

import pytest
import os
import subprocess
import sys

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.xdist_group("freezes")        # it freezes a loop device of its own
def test_bench_runs_and_prints_table_and_targets():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run"), "--idle", "1",
                          "--requests", "20", "--leak-requests", "40", "--crowd", "30",
                          "--concurrent-rounds", "1", "--output-rounds", "1",
                          "--first-starts", "2", "--freeze-rounds", "2", "--output-mb", "1,2",
                          "--memory-pythons", "%d.%d" % sys.version_info[:2]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = [l for l in lines if l.startswith("figure")][0]
    assert "synchook" in header
    assert "synchook (source)" in header
    assert "synchook (info)" in header
    for figure in ("start (ms)", "idle memory (kB RSS)", "GET /sync http p50/p99",
                   "GET /sync https p50/p99", "release p50/p99", "leak after 40 req",
                   "crowd: /sync p50/p99", "100 at once", "200 at once",
                   "output   1 MB: synchook", "output   2 MB: webhook", "first start"):
        assert any(l.startswith(figure) for l in lines), figure
    assert "targets (issue 22), as this run measured them:" in lines
    assert any(l.strip().startswith("first start p95 <= 100 ms") for l in lines)
    assert any(l.startswith("idle memory installed, CPython 3.") for l in lines)
    assert (any(l.startswith("freeze and thaw of a loop-mounted ext4") for l in lines) or
            any(l.startswith("skipped: freeze and thaw against qemu-ga") for l in lines))
    if any(l.startswith("freeze and thaw of a loop-mounted ext4") for l in lines):
        assert any("thaw (request to writable) <= qemu-ga's" in l for l in lines)
    for peer in ("node (XO docs)", "webhook"):
        assert peer in header or ("skipped: %s" % peer) in out.stdout


def test_ab_runs_two_files_side_by_side(tmp_path):
    before = tmp_path / "before.py"
    before.write_bytes(open(os.path.join(ROOT, "synchook.py"), "rb").read())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ab"), "--rounds", "20",
                          str(before), os.path.join(ROOT, "synchook.py")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("20 rounds, interleaved, --log-level warning")
    assert any(l.strip().startswith("before.py (1)") for l in lines)
    assert any(l.strip().startswith("synchook.py (2)") for l in lines)
