"""One generation at a time, a bounded queue, and a clear 'busy' answer when it is full."""

from __future__ import annotations

import time

import pytest

from conftest import Server


@pytest.fixture(scope="module")
def small_queue_server(tiny_dir, tmp_path_factory):
    srv = Server(["--model", str(tiny_dir), "--max-queue", "1"], tmp_path_factory.mktemp("queue"))
    yield srv
    srv.stop()


def test_overflow_is_refused_as_busy_and_the_queue_recovers(small_queue_server):
    from gradio_client.utils import QueueError

    client = small_queue_server.client()
    # Each job takes a few seconds: the first runs, one waits, the rest find the queue full.
    jobs = [client.submit("a slow one", i, False, 1024, 1024, 3.5, 8, api_name="/infer") for i in range(5)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(("done", job.result(timeout=300)))
        except QueueError as err:
            outcomes.append(("busy", str(err)))
    done = [o for o in outcomes if o[0] == "done"]
    busy = [o for o in outcomes if o[0] == "busy"]
    assert len(done) >= 1 and len(busy) >= 1, outcomes
    assert len(done) <= 2  # one running + max-queue 1 waiting
    assert all("try again" in message for _, message in busy)
    # The queue drains and the next request is served.
    path, seed = client.predict("after the rush", 1, False, 256, 256, 3.5, 1, api_name="/infer")
    assert seed == 1


def test_generations_do_not_overlap(small_queue_server):
    from gradio_client.utils import Status

    client = small_queue_server.client()
    steps = 12
    first = client.submit("one", 1, False, 1024, 1024, 3.5, steps, api_name="/infer")
    deadline = time.monotonic() + 120
    while not first.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = client.submit("two", 2, False, 256, 256, 3.5, 2, api_name="/infer")
    # Until the first has sent its next-to-last preview it is still denoising: all that time the
    # second waits in the queue instead of running beside it.
    seen = []
    while len(first.outputs()) < steps - 1 and time.monotonic() < deadline:
        seen.append(second.status().code)
        time.sleep(0.02)
    assert seen and set(seen) <= {Status.STARTING, Status.JOINING_QUEUE, Status.QUEUE_FULL, Status.IN_QUEUE}, set(seen)
    assert Status.IN_QUEUE in seen
    assert second.result(timeout=300)[1] == 2
    assert len(first.outputs()) == steps + 1
