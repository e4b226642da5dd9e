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
    client = small_queue_server.client()
    started = time.monotonic()
    first = client.submit("one", 1, False, 512, 512, 3.5, 6, api_name="/infer")
    time.sleep(0.5)
    second = client.submit("two", 2, False, 512, 512, 3.5, 6, api_name="/infer")
    first.result(timeout=300)
    first_done = time.monotonic() - started
    second.result(timeout=300)
    second_done = time.monotonic() - started
    # With one worker the second finishes a whole generation after the first, not alongside it.
    assert second_done > first_done * 1.5
