"""The project's own promises: one stdlib file, Python 3.6 syntax, README == CI."""

import ast
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
    match = re.search(r"Test it \(what CI runs\):\n\n    (.+)\n", readme)
    assert match, "README lost its test command"
    assert match.group(1) in ci.splitlines()


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
    if shutil.which("vermin") is None:
        pytest.skip("vermin not installed (pip install vermin)")
    out = subprocess.run(["vermin", "-t=3.6-", "--no-tips", "--violations", SYNCHOOK],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    assert out.returncode == 0, out.stdout
