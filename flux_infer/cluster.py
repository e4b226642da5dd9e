"""Scale out on Ray Serve: N replicas of the pipeline, one GPU each, behind the one front end.

`serve --replicas N` (or `--min-replicas/--max-replicas` for autoscaling) starts Ray locally, or
joins a cluster with `--ray-address`, and deploys `Generator`: each replica loads the pipeline from
the same `InferenceSpec` a single-process server uses, and streams each step (with its preview) and
then the image back. The Gradio page, `/infer`, the OpenAI route and the ops routes stay in this
process; `RemoteInference` stands where `FluxInference` stands, so nothing above it changes.
Ray's own HTTP proxy is not started: this process is the only public endpoint.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass

from flux_infer import settings
from flux_infer.errors import first_line
from flux_infer.inference import GenerationCancelled, GenerationFailed, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

APP_NAME = "flux-infer"
NAMESPACE = "flux-infer"


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 1
    min_replicas: int | None = None  # autoscaling bounds; both None: a fixed `replicas`
    max_replicas: int | None = None
    upscale_delay_s: float | None = None  # autoscaling: sustained load before a replica is added; None: Ray's
    address: str | None = None  # an existing cluster (`ray start --head` prints it); None: start one here
    gpus_per_replica: float | None = None  # None: 1 when this machine has CUDA, else 0
    cpus_per_replica: float | None = None  # None: 1 with a GPU, else this machine's cores / replicas

    @property
    def most_replicas(self) -> int:
        return self.max_replicas or self.replicas

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas >= 1:
            raise ValueError("autoscaling needs 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
        if self.upscale_delay_s is not None:
            if self.max_replicas is None:
                raise ValueError("--upscale-delay applies when autoscaling: add --min-replicas and --max-replicas")
            if self.upscale_delay_s < 0:
                raise ValueError(f"--upscale-delay takes seconds, 0 or more, got {self.upscale_delay_s:g}")


class ArrayFrame:
    """A preview that came over Ray as a uint8 array; `image()` as the web layer expects."""

    def __init__(self, pixels):
        self._pixels = pixels

    def image(self):
        from PIL import Image

        return Image.fromarray(self._pixels)


def _make_deployment():
    from ray import serve

    @serve.deployment(max_ongoing_requests=1)
    class Generator:
        """One pipeline. `generate()` streams ("step", index, total, preview array) items, then
        ("result", image array, info); a cancelled call stops its denoising at the step's end."""

        def __init__(self, spec):
            from flux_infer.loading import load_inference

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.inference = load_inference(spec)
            log.info("replica %s ready (pid %d)", self.replica, os.getpid())

        async def generate(self, request: dict):
            import numpy as np

            from flux_infer.inference import stream_run

            log.info("replica %s (pid %d) starting seed %d", self.replica, os.getpid(), request["seed"])
            steps = stream_run(self.inference.run, GenerationRequest.from_dict(request))
            try:
                async for item in steps:
                    if isinstance(item, GenerationResult):
                        result = item
                        continue
                    preview = np.asarray(item.preview.image()) if item.preview is not None else None
                    yield ("step", item.index, item.total, preview)
            finally:
                await steps.aclose()
            log.info("replica %s generated seed %d in %.2f s", self.replica, result.seed, result.seconds)
            yield ("result", np.asarray(result.image), dict(info=dict(result.image.info), seconds=result.seconds,
                                                            cached_steps=result.cached_steps, replica=self.replica,
                                                            gpu_peak_bytes=result.gpu_peak_bytes))

    return Generator


def deployment_options(config: ClusterConfig, gpus: float, cpus: float) -> dict:
    """`Generator.options(...)` for `config`: a fixed number of replicas or autoscaling bounds, each
    replica's GPUs and CPUs (and as many torch threads as CPUs), health checks every few seconds."""
    delay = {} if config.upscale_delay_s is None else dict(upscale_delay_s=config.upscale_delay_s)
    scaling = (dict(autoscaling_config=dict(min_replicas=config.min_replicas, max_replicas=config.max_replicas,
                                            target_ongoing_requests=1, **delay))
               if config.max_replicas is not None else dict(num_replicas=config.replicas))
    threads = str(max(1, int(cpus)))
    return dict(ray_actor_options=dict(num_gpus=gpus, num_cpus=cpus,
                                       runtime_env=dict(env_vars={"OMP_NUM_THREADS": threads,
                                                                  "RAY_USAGE_STATS_ENABLED": "0"})),
                health_check_period_s=settings.REPLICA_HEALTH_CHECK_S, **scaling)


def start(spec, config: ClusterConfig):
    """Start or join Ray, deploy the replicas (waiting until they have loaded), return RemoteInference."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config.check()
    import ray
    import torch
    from ray import serve

    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    cpus = config.cpus_per_replica
    if cpus is None:
        cpus = 1 if gpus else max(0.5, (os.cpu_count() or 1) / config.most_replicas)
    if config.address:
        ray.init(address=config.address, namespace=NAMESPACE, log_to_driver=True)
    else:
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=True)
    serve.start(proxy_location="Disabled")
    deployment = _make_deployment().options(**deployment_options(config, gpus, cpus))
    started = time.perf_counter()
    try:
        handle = serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)
    except RuntimeError:  # "Deploying application flux-infer failed": the reason is in its status
        reason = replica_failure(serve.status().applications.get(APP_NAME))
        serve.delete(APP_NAME)  # on a cluster that outlives this server, nothing is left retrying
        from flux_infer.loading import ModelLoadError

        raise ModelLoadError(f"the replicas could not start: {reason}") from None
    log.info("Ray Serve: %s replicas (%g GPU, %g CPU each) ready in %.0f s%s",
             f"{config.min_replicas}-{config.max_replicas}" if config.max_replicas is not None else config.replicas,
             gpus, cpus, time.perf_counter() - started, f", cluster {config.address}" if config.address else "")
    # The streaming handle is made here, once, in one thread: `options()` on a handle that has not
    # sent a request sets its router up unguarded, and the service's threads calling it at once
    # could each make one; Ray's controller then saw only part of the load (in one CI run none of
    # it), and autoscaling added no replica.
    return RemoteInference(handle.options(stream=True))


# The line of a traceback that names the exception: "flux_infer.tuning.OptionError: --quantize ...".
EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def replica_failure(app) -> str:
    """Why Ray Serve could not start the replicas, from the application's status (`serve.status()`):
    the message of the exception their constructor raised (flux-infer's own say what to do), else
    Ray's message."""
    unsaid = "Ray Serve did not say why (see its log above)"
    if app is None:
        return unsaid
    messages = [deployment.message for deployment in app.deployments.values() if deployment.message]
    lines = [line for line in ("\n".join(messages) or app.message).splitlines() if line.strip()]
    found = [match for match in map(EXCEPTION_LINE.match, lines) if match]
    if not found:
        return lines[0].strip() if lines else unsaid
    name, message = found[-1].groups()
    return message if name in ("OptionError", "ModelLoadError", "DeviceError") else f"{name}: {message}"


class RemoteInference:
    """The Backend (see inference.Backend) over a Ray Serve handle: steps and previews stream back as
    they come; the result's `seconds` is the replica's own generation time."""

    def __init__(self, handle):
        self.handle = handle  # a streaming DeploymentHandle to Generator, its router set up

    def run(self, request: GenerationRequest, *, on_step=None, cancel=None) -> GenerationResult:
        from PIL import Image
        from ray.exceptions import RayError

        from flux_infer.previews import Step

        started = time.perf_counter()
        stream = self.handle.generate.remote(asdict(request))
        try:
            for item in stream:
                if cancel is not None and cancel.is_set():
                    stream.cancel()
                    raise GenerationCancelled(f"cancelled after step {item[1] if item[0] == 'step' else '?'}")
                if item[0] == "step":
                    _, index, total, preview = item
                    if on_step is not None:
                        on_step(Step(index=index, total=total,
                                     preview=ArrayFrame(preview) if preview is not None else None))
                    continue
                _, pixels, extra = item
                image = Image.fromarray(pixels)
                image.info.update(extra["info"])
                log.info("replica %s served seed %d: %.2f s there, %.2f s with the round trip", extra["replica"],
                         request.seed, extra["seconds"], time.perf_counter() - started)
                return GenerationResult(image=image, seed=request.seed, request=request,
                                        seconds=extra["seconds"], cached_steps=extra["cached_steps"],
                                        replica=extra["replica"], gpu_peak_bytes=extra["gpu_peak_bytes"])
        except RayError as err:
            cause = type(getattr(err, "cause", None) or err).__name__
            if "Cancelled" in cause or "TaskCancelled" in type(err).__name__:
                raise GenerationCancelled("cancelled") from None
            log.error("replica failed: %s", first_line(err))
            raise GenerationFailed("the replica serving this request stopped before it finished "
                                   f"({type(err).__name__}); try again: Ray Serve replaces it") from None
        raise GenerationFailed("the replica ended the stream without an image; try again")
