"""One generation at a time, one bounded line for every door, and a clear 'busy' answer when it is full."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import Server, wait_for
from gradio_client.utils import Status

pytestmark = pytest.mark.e2e  # starts servers


@pytest.fixture(scope="module")
def small_queue_server(tiny_dir, tmp_path_factory):
    srv = Server(["--model", str(tiny_dir), "--max-queue", "1"], tmp_path_factory.mktemp("queue"))
    yield srv
    srv.stop()


def test_overflow_is_refused_as_busy_and_the_queue_recovers(small_queue_server):
    from gradio_client.exceptions import AppError

    client = small_queue_server.client()
    # Each job takes a few seconds: the first runs, one waits, the rest find the queue full.
    jobs = [client.submit("a slow one", i, False, 1024, 1024, 3.5, 8, api_name="/infer") for i in range(5)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(("done", job.result(timeout=300)))
        except AppError as err:
            outcomes.append(("busy", str(err)))
    done = [o for o in outcomes if o[0] == "done"]
    busy = [o for o in outcomes if o[0] == "busy"]
    assert len(done) >= 1 and len(busy) >= 1, outcomes
    assert len(done) <= 2  # one running + max-queue 1 waiting
    assert all("the server is busy (1 requests waiting): try again shortly" in message for _, message in busy)
    # The queue drains and the next request is served.
    path, seed = client.predict("after the rush", 1, False, 256, 256, 3.5, 1, api_name="/infer")
    assert seed == 1


def test_generations_do_not_overlap_and_a_waiting_page_sees_its_place_in_line(small_queue_server):
    client = small_queue_server.client()
    steps = 12
    first = client.submit("one", 1, False, 1024, 1024, 3.5, steps, api_name="/infer")
    deadline = time.monotonic() + 120
    while not first.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = client.submit("two", 2, False, 256, 256, 3.5, 2, api_name="/infer")
    # Until the first has sent its next-to-last preview it is still denoising: all that time the
    # second waits in line instead of running beside it, and says where it stands.
    said, outputs = set(), []
    while len(first.outputs()) < steps - 1 and time.monotonic() < deadline:
        status = second.status()
        said.update(unit.desc for unit in status.progress_data or [])
        outputs.append(len(second.outputs()))
        time.sleep(0.02)
    assert outputs and set(outputs) == {0}
    assert "Waiting in line: 1 ahead" in said, said
    assert second.result(timeout=300)[1] == 2
    assert first.result(timeout=300)[1] == 1  # each job's outputs are complete once it is done
    assert len(first.outputs()) == steps + 1


def test_the_page_and_the_openai_route_share_one_max_queue(small_queue_server):
    import openai
    from gradio_client.exceptions import AppError

    srv = small_queue_server
    client = srv.client()
    api = openai.OpenAI(base_url=srv.url + "v1", api_key="not-needed", max_retries=0, timeout=300)
    tiny = {"num_inference_steps": 1}
    running = client.submit("hold the lock", 1, False, 1024, 1024, 3.5, 12, api_name="/infer")
    wait_for(running.outputs, "the first generation's first preview")
    # An OpenAI request takes the one place in the queue...
    answers = {}
    waiter = threading.Thread(target=lambda: answers.update(
        queued=api.images.generate(prompt="queued through /v1", size="256x256", extra_body={"seed": 5, **tiny})))
    waiter.start()
    wait_for(lambda: srv.scheduler_depth() == 1, "the /v1 request to join the line")
    # ...so the page's door is full as well as the OpenAI one.
    with pytest.raises(AppError, match="try again"):
        client.submit("no room", 2, False, 256, 256, 3.5, 1, api_name="/infer").result(timeout=120)
    with pytest.raises(openai.APIStatusError, match="busy") as refused:
        api.images.generate(prompt="no room either", size="256x256", extra_body={"seed": 6, **tiny})
    assert refused.value.status_code == 503
    assert running.result(timeout=300)[1] == 1
    waiter.join(timeout=300)
    assert answers["queued"].data[0].model_extra["seed"] == 5
    # Once the OpenAI request is done its place is Gradio's again.
    assert client.predict("room again", 3, False, 256, 256, 3.5, 1, api_name="/infer")[1] == 3


@pytest.fixture(scope="module")
def line_server(server):
    return server  # the session's server (--max-queue 16): room for the lines these tests make


def test_mixed_doors_are_served_first_come_first_served(line_server):
    import openai

    srv = line_server
    client = srv.client()
    api = openai.OpenAI(base_url=srv.url + "v1", api_key="-", max_retries=0, timeout=300)
    holder = client.submit("holder", 1, False, 1024, 1024, 3.5, 12, api_name="/infer")
    wait_for(lambda: "gradio request: 'holder'" in srv.log(), "the first generation to start")
    threads, jobs = [], []
    for index in range(6):  # page, /v1, page, /v1, ...: each joins only after the one before is in line
        prompt = f"in line {index}"
        if index % 2:
            thread = threading.Thread(target=api.images.generate, kwargs=dict(
                prompt=prompt, size="256x256", extra_body={"seed": index, "num_inference_steps": 1}))
            thread.start()
            threads.append(thread)
        else:
            jobs.append(client.submit(prompt, index, False, 256, 256, 3.5, 1, api_name="/infer"))
        wait_for(lambda: srv.scheduler_depth() == index + 1, f"request {index} to join the line")
    holder.result(timeout=300)
    for job in jobs:
        job.result(timeout=300)
    for thread in threads:
        thread.join(timeout=300)
    log = srv.log()
    started = [log.index(f"request: 'in line {index}'") for index in range(6)]
    assert started == sorted(started), "served out of order"
    assert [line.split(" request:")[0].rsplit(" ", 1)[-1] for line in log.splitlines()
            if "request: 'in line" in line] == ["gradio", "openai"] * 3


def test_a_waiting_request_whose_caller_leaves_never_runs(line_server):
    import openai

    srv = line_server
    client = srv.client()
    api = openai.OpenAI(base_url=srv.url + "v1", api_key="-", max_retries=0)
    # As long a generation as the Space allows (cancelled below): it must outlast everything before that.
    holder = client.submit("hold on", 2, False, 2048, 2048, 3.5, 50, api_name="/infer")
    wait_for(lambda: "gradio request: 'hold on'" in srv.log(), "the first generation to start")
    # Another user (Gradio cancels by session: a second job of the same client would take the first with it).
    leaver = srv.client().submit("page that leaves", 3, False, 256, 256, 3.5, 1, api_name="/infer")
    wait_for(lambda: srv.scheduler_depth() == 1, "the page request to join the line")
    # gradio_client learns its event id only when the join's answer reaches it, which can come after
    # the server has put the job in line; a cancel before that names no event and cancels nothing.
    # Its first status from the event stream ("Waiting in line") means it knows the id.
    wait_for(lambda: leaver.status().code in (Status.PROGRESS, Status.PROCESSING), "the leaver to hear of its place")
    leaver.cancel()
    wait_for(lambda: srv.scheduler_depth() == 0, "the page request to leave the line")
    hung_up = "closed the connection while waiting in line"
    before = srv.log().count(hung_up)  # a session-wide server: count this test's own
    with pytest.raises(openai.APITimeoutError):  # a /v1 caller that gives up while waiting
        api.with_options(timeout=1.0).images.generate(prompt="caller that hangs up", size="256x256",
                                                      extra_body={"seed": 4, "num_inference_steps": 1})
    wait_for(lambda: srv.log().count(hung_up) > before, "the /v1 request to leave")
    assert srv.scheduler_depth() == 0
    after = srv.client().submit("after them", 5, False, 256, 256, 3.5, 1, api_name="/infer")
    wait_for(lambda: srv.scheduler_depth() == 1, "the next request to join the line")
    holder.cancel()  # it has held the line long enough: the next one need not wait for its 50 steps
    assert after.result(timeout=300)[1] == 5
    log = srv.log()
    assert "request: 'page that leaves'" not in log and "request: 'caller that hangs up'" not in log
    assert log.index("gradio request: 'hold on'") < log.index("gradio request: 'after them'")
