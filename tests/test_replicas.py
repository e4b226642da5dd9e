"""Ray Serve replicas of the tiny model (tests/replica_scenarios.py), in a network namespace that has
only loopback: Ray probes cloud-metadata addresses at start even with usage stats off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).with_name("replica_scenarios.py")


@pytest.mark.e2e  # starts a server and Ray
def test_replicas_autoscale_spread_stream_agree_and_survive_a_kill(tiny_dir, tmp_path):
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    assert probe.returncode == 0, ("these tests run Ray in a loopback-only network namespace and need "
                                   f"`unshare -n` (root or user namespaces): {probe.stderr.strip()}")
    command = f"ip link set lo up && exec {sys.executable} {SCENARIOS} {tiny_dir} {tmp_path}"
    result = subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True, text=True, timeout=1200)
    print(result.stdout)
    server_logs = "".join(path.read_text(errors="replace")[-4000:] for path in tmp_path.glob("server-*.log"))
    # Ray Serve's controller says what it decided (autoscaling, replacements) in its own log.
    controller = "".join(path.read_text(errors="replace")[-3000:]
                         for path in Path("/tmp/ray/session_latest/logs/serve").glob("controller_*.log"))
    assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), (
        result.stdout[-3000:] + result.stderr[-3000:] + server_logs + "\nRay Serve controller:\n" + controller)


def test_replica_options_are_ones_ray_serve_takes():
    """A fixed count and autoscaling bounds reach Ray Serve's deployment as asked (the scenario above
    runs the autoscaling one), each replica with its GPUs, CPUs and as many torch threads."""
    from flux_infer import settings
    from flux_infer.cluster import ClusterConfig, _make_deployment, deployment_options

    fixed = deployment_options(ClusterConfig(replicas=3), gpus=1, cpus=4)
    deployment = _make_deployment().options(**fixed)  # Ray Serve checks names and values here
    assert deployment.num_replicas == 3 and "autoscaling_config" not in fixed
    assert deployment.ray_actor_options == {"num_gpus": 1, "num_cpus": 4, "runtime_env": {"env_vars": {
        "OMP_NUM_THREADS": "4", "RAY_USAGE_STATS_ENABLED": "0"}}}
    assert fixed["health_check_period_s"] == settings.REPLICA_HEALTH_CHECK_S < 10  # Ray's default: 10 s

    scaled = deployment_options(ClusterConfig(min_replicas=0, max_replicas=2, upscale_delay_s=5), gpus=0, cpus=0.5)
    deployment = _make_deployment().options(**scaled)
    assert "num_replicas" not in scaled and scaled["autoscaling_config"] == {
        "min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 5}
    assert deployment.ray_actor_options["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_a_replica_that_cannot_start_is_said_by_its_own_error():
    """What `serve.status()` holds after a failed deploy: each deployment's message ends with the
    traceback of the replica's constructor."""
    from types import SimpleNamespace

    from flux_infer.cluster import replica_failure

    def app(message, app_message="Deploying app 'flux-infer' failed"):
        return SimpleNamespace(message=app_message, deployments={"Generator": SimpleNamespace(message=message)})

    traceback = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
                 "ray::ServeReplica:flux-infer:Generator.initialize_and_get_metadata() (pid=1)\n"
                 "RuntimeError: Traceback (most recent call last):\n"
                 '  File "flux_infer/tuning.py", line 260, in check_plan\n'
                 "flux_infer.tuning.OptionError: --quantize nf4 (bitsandbytes) needs a CUDA GPU; use int8")
    assert replica_failure(app(traceback)) == "--quantize nf4 (bitsandbytes) needs a CUDA GPU; use int8"
    assert replica_failure(app(traceback.replace("flux_infer.tuning.OptionError", "torch.OutOfMemoryError"))) == (
        "OutOfMemoryError: --quantize nf4 (bitsandbytes) needs a CUDA GPU; use int8")
    assert replica_failure(app("", "Replicas need 2 GPUs and the cluster has 0")) == (
        "Replicas need 2 GPUs and the cluster has 0")
    assert replica_failure(None) == "Ray Serve did not say why (see its log above)"
