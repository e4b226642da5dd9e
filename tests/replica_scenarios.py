"""The Ray Serve scenarios, run by tests/test_replicas.py inside a network namespace with only
loopback (Ray probes outside addresses at start). Not collected by pytest on its own.

    unshare -n sh -c 'ip link set lo up && python tests/replica_scenarios.py TINY_DIR WORKDIR'
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
from conftest import Server, wait_for
from PIL import Image


def start_server(tiny: str, workdir: Path, *flags: str, env: dict | None = None) -> Server:
    """`flux-infer serve` with Ray Serve replicas and latent previews, once it answers."""
    return Server(["--model", tiny, *flags, "--preview", "latent"], workdir, startup_s=240,
                  env={"RAY_DEDUP_LOGS": "0", **(env or {})})


# One torch thread per replica: the busy replica leaves the other core to the one starting (on two
# cores it would otherwise starve it). The server's handle reports its load to Ray every
# `metrics_interval_s` of the autoscaling config (10 s; Ray 2.60 reads no environment variable for
# it), so the second replica comes some 10-30 s into the load.
AUTOSCALE_ENV = {"OMP_NUM_THREADS": "1"}


class RayView:
    """What Ray Serve's controller counts as the deployment's ongoing requests (running and waiting at
    the handle), read every 2 s from the scenario: when autoscaling is slow, this says whether the load
    never reached the controller or the controller did not act on it. Diagnostics only: it reads the
    controller's testing accessor, and says so instead of failing when that is not there."""

    def __init__(self):
        import threading

        self.points: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        import ray

        try:
            from ray.serve._private.common import DeploymentID

            ray.init(address="auto", namespace="serve", log_to_driver=False, logging_level="ERROR")
            controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
            deployment = DeploymentID(name="Generator", app_name="flux-infer")
            while not self._stop.wait(2):
                total = ray.get(controller._get_total_num_requests_for_deployment_for_testing.remote(deployment))
                self.points.append((time.monotonic() - self.started, f"{total:.2f}"))
        except Exception as err:  # noqa: BLE001 - diagnostics must not fail the scenario
            self.points.append((time.monotonic() - self.started, f"unreadable: {type(err).__name__}: {err}"[:200]))
        finally:
            ray.shutdown()  # before the server stops Ray: a driver left connected would be ended with it

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=30)
        return "Ray's count of ongoing requests (s: count): " + ", ".join(f"{t:.0f}: {v}" for t, v in self.points)


def main(tiny: str, workdir: Path) -> None:
    """--min-replicas 1 --max-replicas 2: one replica at start, a second under sustained load; then the
    two spread, stream and agree with a single process, and a killed one is replaced."""
    from gradio_client.exceptions import AppError

    from flux_infer.loading import InferenceSpec, load_inference

    server = start_server(tiny, workdir, "--min-replicas", "1", "--max-replicas", "2", "--upscale-delay", "2",
                          env=AUTOSCALE_ENV)
    log = server.log
    try:
        assert len(set(re.findall(r"replica (\w+) ready", log()))) == 1, log()[-3000:]
        client = server.client()
        started = time.monotonic()
        # A hang guard, not a bound: the load reaches Ray's controller within one report interval
        # (see AUTOSCALE_ENV), and the second replica serves some 20-40 s in on two cores.
        deadline = started + 420
        ray_view = RayView()
        seed = 0
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            def submit(seed):
                return pool.submit(client.predict, "busy", seed, False, 512, 512, 3.5, 8, api_name="/infer")

            # Four requests in flight at all times (a new one as each ends, not in waves): the replica
            # is never idle between waves, so Ray's average of ongoing requests stays above its target.
            jobs = {submit(seed + i): seed + i for i in range(4)}
            seed += 4
            while len(set(re.findall(r"replica (\w+) served seed", log()))) < 2:
                assert time.monotonic() < deadline, log()[-3000:] + "\n" + ray_view.stop()
                done, _ = concurrent.futures.wait(jobs, timeout=300, return_when=concurrent.futures.FIRST_COMPLETED)
                for job in done:
                    assert job.result()[1] == jobs.pop(job)
                    jobs[submit(seed)] = seed
                    seed += 1
            for job, expected in jobs.items():
                assert job.result(timeout=300)[1] == expected
        print(f"autoscaling: a second replica served {time.monotonic() - started:.0f} s into a sustained load "
              f"of 4 concurrent requests ({seed} requests)")
        print(ray_view.stop())

        # 4 concurrent requests are spread over both replicas.
        seeds = [1000, 1001, 1002, 1003]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(client.predict, "a ray of light", seed, False, 512, 512, 3.5, 8, api_name="/infer")
                    for seed in seeds]
            outputs = [job.result(timeout=300) for job in jobs]
        assert [seed for _, seed in outputs] == seeds
        served = set(re.findall(r"replica (\w+) served seed 100[0-3]\b", log()))
        assert len(served) == 2, log()[-3000:]
        metrics = server.http.get("metrics").text
        counted = dict(re.findall(r'flux_replica_images_total\{replica="(\w+)"\} ([\d.]+)', metrics))
        assert set(counted) == served and sum(map(float, counted.values())) == seed + len(seeds), (counted, seed)
        # Each image is also timed by the replica that made it.
        timed = dict(re.findall(r'flux_replica_generation_seconds_count\{replica="(\w+)"\} ([\d.]+)', metrics))
        assert timed == counted, (timed, counted)
        print(f"4 concurrent requests served by replicas {sorted(served)}; /metrics counts {counted}")

        # The same seed gives the same pixels as a single process with the replicas' thread count
        # (on a CPU the number of threads changes float rounding; on GPUs it does not apply).
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        single = load_inference(InferenceSpec(model=tiny, device="cpu"))
        reference = single.infer("a ray of light", seed=1000, randomize_seed=False, width=512, height=512,
                                 num_inference_steps=8)
        np.testing.assert_array_equal(np.asarray(Image.open(outputs[0][0]).convert("RGB")),
                                      np.asarray(reference.image.convert("RGB")))
        print("seed 1000: pixel-identical to the single-process pipeline")

        # An edit travels to a replica with its image and mask, and comes back as a single process
        # makes it.
        from dataclasses import replace

        from flux_infer.inference import build_request

        picture = reference.image.convert("RGB")
        mask = Image.new("L", picture.size)
        mask.paste(255, (0, 0, picture.size[0] // 2, picture.size[1]))
        buffers = {name: io.BytesIO() for name in ("image", "mask")}
        picture.save(buffers["image"], format="PNG")
        mask.save(buffers["mask"], format="PNG")
        edited = server.http.post("v1/images/edits", timeout=300, files={
            name: (f"{name}.png", buffer.getvalue(), "image/png") for name, buffer in buffers.items()},
            data={"prompt": "a ray of dark", "seed": "3", "num_inference_steps": "8", "strength": "0.7"})
        assert edited.status_code == 200, edited.text
        expected = single.run(replace(build_request("a ray of dark", seed=3, randomize_seed=False, width=512,
                                                    height=512, num_inference_steps=8),
                                      image=picture, mask=mask, strength=0.7))
        made = Image.open(io.BytesIO(base64.b64decode(edited.json()["data"][0]["b64_json"]))).convert("RGB")
        np.testing.assert_array_equal(np.asarray(made), np.asarray(expected.image.convert("RGB")))
        print("an inpainting edit on a replica: pixel-identical to the single process")

        # Previews stream back from the replica.
        streamed = list(client.submit("previews", 5, False, 512, 512, 3.5, 6, api_name="/infer"))
        assert len(streamed) >= 7, len(streamed)
        print(f"submit() streamed {len(streamed)} outputs for 6 steps")

        # The OpenAI route goes to the replicas too.
        body = server.http.post("v1/images/generations", timeout=300, json={
            "prompt": "a ray of light", "size": "512x512", "seed": 0, "num_inference_steps": 8}).json()
        assert body["seeds"] == [0], body

        # A replica killed mid-generation: that request gets a clear error, the next is served, and
        # Ray Serve starts a replacement.
        # Its seed is one the load above never sent, and only log lines written after the submit count
        # (a replica that made a lower seed earlier must not be taken for the one serving this).
        doomed = 10**6 + 77
        mark = len(log())
        job = client.submit("doomed", doomed, False, 1024, 1024, 3.5, 28, api_name="/infer")
        starting = rf"replica (\w+) \(pid (\d+)\) starting seed {doomed}\b"
        wait_for(lambda: re.search(starting, log()[mark:]), f"a replica to start seed {doomed}", timeout=60)
        victim, pid = re.search(starting, log()[mark:]).groups()
        wait_for(job.outputs, "a preview from the replica (it is then mid-generation)", timeout=60)
        os.kill(int(pid), signal.SIGKILL)
        started = time.monotonic()
        try:
            job.result(timeout=120)
            raise AssertionError("the killed replica's request did not fail")
        except AppError as err:
            assert "the replica serving this request stopped" in str(err), str(err)
        print(f"killed replica {victim}: its request failed in {time.monotonic() - started:.1f} s with: "
              "the replica serving this request stopped ...")
        assert client.predict("after", 8, False, 256, 256, 3.5, 2, api_name="/infer")[1] == 8
        wait_for(lambda: len(set(re.findall(r"replica (\w+) ready", log())) - {victim}) >= 2,
                 "a replacement replica", timeout=120)
        print(f"replacement ready {time.monotonic() - started:.0f} s after the kill")
    finally:
        server.stop(timeout=60)  # Ray's processes end with the server

    # A replica that cannot load (here: nf4 needs CUDA) stops the server's start with its reason.
    import subprocess

    failed = subprocess.run([sys.executable, "-m", "flux_infer", "serve", "--model", tiny, "--replicas", "1",
                             "--port", "0", "--quantize", "nf4"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "XDG_CACHE_HOME": str(workdir / "cache")})
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert last == ("flux-infer: error: the replicas could not start: --quantize nf4 (bitsandbytes) needs a CUDA "
                    "GPU; on a CPU use int8, fp8 or fp8-storage"), failed.stderr[-3000:]
    print("a replica that cannot load: " + last)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
