"""Consistent snapshots, proven: real databases under write load, a VM's disks
snapshotted one after another as XAPI does, through XO's own hook code, every
snapshot checked on a copy (tests/consistency.py says how).

CI's short version: a few snapshots per mode, and every one taken with synchook
(--freeze of the database's disks, or the README's recipe run as written) must be
consistent.  bench/consistency is the long version, with the modes without a
freeze beside them.
"""

import pytest

import consistency

pytestmark = pytest.mark.slow

DATABASES = ["postgresql", "mariadb", "sqlite"]


def skip_unless_possible(kind):
    reason = consistency.missing(kind)
    if reason:
        pytest.skip(reason)


def describe(finding):
    """One line, and synchook's log when a hook's answer was not 200."""
    return "%s #%d (gap %.2f s): %s%s" % (
        finding["mode"], finding["number"], finding["gap"],
        "; ".join(finding["problems"]) or "consistent",
        "\nsynchook's log:\n" + finding["log"] if "log" in finding else "")


@pytest.mark.parametrize("kind", DATABASES)
def test_every_snapshot_taken_with_synchook_is_consistent(kind):
    skip_unless_possible(kind)
    results, _ = consistency.consistency_run(kind, ["freeze", "recipe"], 2, baseline=0,
                                             settle=(0.2, 0.5))
    findings = results["freeze"] + results["recipe"]
    print("\n" + "\n".join(describe(finding) for finding in findings))
    assert len(findings) == 4
    for finding in findings:
        assert finding["hooks"] == [("sync", 200), ("post-sync", 200)], describe(finding)
        assert finding["journal_replay"] == [], describe(finding)   # frozen: nothing pending
        assert finding["consistent"], describe(finding)


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_the_checks_catch_a_checkpoint_between_the_two_disks_snapshots(kind):
    """The checker must be able to fail, every time: with no synchook, the database
    checkpoints (PostgreSQL's CHECKPOINT; InnoDB's pages flushed by FLUSH TABLES ...
    FOR EXPORT) between the log disk's snapshot and the data disk's, so the data
    disk holds pages and a checkpoint the log disk has never seen.  (With a mere gap
    between the disks the torn pair is likely, not certain: bench/consistency says
    how likely.)"""
    skip_unless_possible(kind)
    results, _ = consistency.consistency_run(kind, ["none"], 1, baseline=0, settle=(0.2, 0.5),
                                             checkpoint_between=True)
    print("\n" + "\n".join(describe(finding) for finding in results["none"]))
    assert len(results["none"]) == 1
    for finding in results["none"]:
        assert not finding["consistent"], describe(finding)
