"""Ray Serve with 2 replicas of the tiny model (tests/replica_scenarios.py), in a network namespace
that has only loopback: Ray probes cloud-metadata addresses at start even with usage stats off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # starts servers and Ray

SCENARIOS = Path(__file__).with_name("replica_scenarios.py")


def run_scenario(name: str, tiny_dir: Path, workdir: Path) -> None:
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    assert probe.returncode == 0, ("these tests run Ray in a loopback-only network namespace and need "
                                   f"`unshare -n` (root or user namespaces): {probe.stderr.strip()}")
    command = f"ip link set lo up && exec {sys.executable} {SCENARIOS} {tiny_dir} {workdir} {name}"
    result = subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True, text=True, timeout=900)
    print(result.stdout)
    server_logs = "".join(path.read_text(errors="replace")[-4000:] for path in workdir.glob("server-*.log"))
    assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), (
        result.stdout[-3000:] + result.stderr[-3000:] + server_logs)


def test_two_replicas_spread_stream_agree_and_survive_a_kill(tiny_dir, tmp_path):
    run_scenario("main", tiny_dir, tmp_path)


def test_autoscaling_adds_a_replica_under_sustained_load(tiny_dir, tmp_path):
    run_scenario("autoscale", tiny_dir, tmp_path)
