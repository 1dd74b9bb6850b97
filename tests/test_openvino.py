"""Runs tests/openvino_cases.py in a process of its own: OpenVINO's runtime keeps worker
threads for the rest of a process, and a later test that sends itself SIGTERM
(test_training's) crashed the shared pytest process with them alive; the product never
mixes the two (training does not load OpenVINO)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("openvino")


def test_the_openvino_backend_cases_pass_in_their_own_process():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "openvino_cases.py")],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
