"""Start and serve under every CPython found (3.6 and up), over HTTP and HTTPS."""

import signal

import pytest

from conftest import interpreters, run, SYNCHOOK


@pytest.mark.parametrize("python", interpreters())
def test_serves_under_interpreter(start, rec, python, tmp_path):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), python=python,
              state_dir=tmp_path / "fresh-state")        # generates its own certificate
    assert d.get("/sync", tls=True) == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    assert d.get("/sync", tls=True) == (200, "Ok")
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert rec.lines() == ["sync", "post", "sync", "post"]


@pytest.mark.parametrize("python", interpreters())
def test_help_and_bad_config_under_interpreter(python):
    assert run([python, SYNCHOOK, "--help"]).returncode == 0
    bad = run([python, SYNCHOOK, "--port", "99999"])
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "port out of range" in bad.stderr
