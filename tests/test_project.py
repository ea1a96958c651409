"""The project's own promises: one stdlib file, Python 3.6 syntax, README == CI."""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SYNCHOOK


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    match = re.search(r"Test it \(what CI runs\):\n\n((?:    .+\n)+)", readme)
    assert match, "README lost its test command"
    commands = [line[4:] for line in match.group(1).splitlines()]
    assert len(commands) == 2 and commands[0].startswith("python3 -m venv .venv")
    assert "pytest" in commands[1] and "-rs" in commands[1]
    assert "-n 2 --dist loadgroup" in commands[1]          # tests/conftest.py's xdist_group
    for command in commands:
        assert command in ci.splitlines()


def test_only_standard_library_imports():
    tree = ast.parse(open(SYNCHOOK).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:
        pytest.skip("needs Python 3.10+ for sys.stdlib_module_names")
    assert sorted(n for n in names if n not in stdlib) == []


def test_vermin_says_python_3_6():
    # Through this interpreter (the venv's), not PATH: a skip can only mean vermin is
    # missing from tests/requirements.txt's install.
    if importlib.util.find_spec("vermin") is None:
        pytest.skip("vermin not installed (pip install vermin)")
    out = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
                          "-t=3.6-", "--no-tips", "--violations", SYNCHOOK],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    assert out.returncode == 0, out.stdout


def test_readme_curl_block_works_pasted_as_one_block(tmp_path):
    """The "Trying it with curl" block, run as it is (another port and directory)."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (apt-get install curl)")
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Trying it with curl\n\n", 1)[1]
    block = section.split("\n\n    ", 1)[1].split("\n\n", 1)[0]     # the indented block
    lines = [line[4:] for line in ("    " + block).splitlines()]
    assert "1727/" not in block, "the curl demo must not talk to an installed agent's port"
    from conftest import free_port
    script = "\n".join(lines).replace("17270", str(free_port())).replace(
        "/tmp/synchook-try", str(tmp_path / "try")).replace("python3 synchook.py",
                                                           "%s %s" % (sys.executable, SYNCHOOK))
    out = subprocess.run(["bash", "-c", script + "\nwait"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert out.stdout.splitlines().count("Ok") == 2, out.stdout
    assert '"state": "idle"' in out.stdout and "thawing" in out.stdout
