"""The one line every door waits in: admission, order, leaving, slots and the drain (no server)."""

from __future__ import annotations

import asyncio
import time

import pytest

from flux_infer.scheduler import Busy, Scheduler


def run(coroutine):
    return asyncio.run(coroutine)


async def _settle():
    """Let every task that can move, move."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_first_come_first_served_across_doors_and_a_full_line_is_refused_at_once():
    async def scenario():
        scheduler = Scheduler(slots=1, max_queue=3)
        order = []

        async def request(route, name):
            ticket = scheduler.admit(route)
            await scheduler.turn(ticket)
            order.append(name)
            await asyncio.sleep(0)  # "generating"
            scheduler.leave(ticket)

        first = scheduler.admit("gradio")  # runs at once: holds the one slot
        await scheduler.turn(first)
        tasks = []
        for route, name in [("openai", "a"), ("gradio", "b"), ("mcp", "c")]:
            tasks.append(asyncio.create_task(request(route, name)))
            await _settle()  # each joins after the one before
        assert (scheduler.running, scheduler.waiting) == (1, 3)
        with pytest.raises(Busy, match=r"the server is busy \(3 requests waiting\): try again shortly"):
            scheduler.admit("openai")
        scheduler.leave(first)
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"]
        assert (scheduler.running, scheduler.waiting) == (0, 0)
        # The line is free again.
        again = scheduler.admit("openai")
        await scheduler.turn(again)
        assert again.waited >= 0

    run(scenario())


def test_a_waiting_request_whose_caller_leaves_is_dropped_at_once_and_never_runs():
    async def scenario():
        scheduler = Scheduler(slots=1, max_queue=4)
        holder = scheduler.admit("gradio")
        await scheduler.turn(holder)
        positions = {}
        tickets = [scheduler.admit(route) for route in ("gradio", "openai", "mcp")]
        waits = [asyncio.create_task(scheduler.turn(t, on_position=lambda ahead, i=i: positions.setdefault(i, []).append(ahead)))
                 for i, t in enumerate(tickets)]
        await _settle()
        assert {i: p[-1] for i, p in positions.items()} == {0: 1, 1: 2, 2: 3}  # the running one counts as ahead
        waits[1].cancel()  # the caller in the middle hangs up
        await _settle()
        assert waits[1].cancelled() and scheduler.waiting == 2
        assert scheduler.last_finished is None  # a leaver is no generation that ended
        assert positions[2][-1] == 2  # the one behind moved up at once
        scheduler.leave(holder)
        await waits[0]
        assert scheduler.running == 1 and not waits[2].done()
        scheduler.leave(tickets[0])
        await waits[2]
        assert tickets[1].started is None  # it never got a turn
        scheduler.leave(tickets[1])  # leaving twice changes nothing
        scheduler.leave(tickets[2])
        assert (scheduler.running, scheduler.waiting) == (0, 0)

    run(scenario())


def test_slots_run_that_many_at_once():
    async def scenario():
        scheduler = Scheduler(slots=2, max_queue=2)
        a, b, c = (scheduler.admit("gradio") for _ in range(3))
        await scheduler.turn(a)
        await scheduler.turn(b)
        waiting = asyncio.create_task(scheduler.turn(c))
        await _settle()
        assert scheduler.running == 2 and not waiting.done()
        scheduler.leave(b)
        await waiting
        assert scheduler.running == 2

    run(scenario())


def test_closing_refuses_new_requests_and_serves_every_admitted_one():
    async def scenario():
        scheduler = Scheduler(slots=1, max_queue=8)
        tickets = [scheduler.admit(route) for route in ("gradio", "openai", "mcp")]
        scheduler.close()
        with pytest.raises(Busy, match="the server is shutting down: try again when it is back"):
            scheduler.admit("gradio")
        drained = asyncio.create_task(scheduler.drained())
        served = []
        for ticket in tickets:
            await scheduler.turn(ticket)
            served.append(ticket.route)
            await _settle()
            assert not drained.done()
            before = time.monotonic()
            scheduler.leave(ticket)
            assert before <= scheduler.last_finished <= time.monotonic()  # when the last generation ended
        await drained
        assert served == ["gradio", "openai", "mcp"]

    run(scenario())


def test_limits_are_checked():
    with pytest.raises(ValueError, match="slots and max_queue must be at least 1"):
        Scheduler(slots=0, max_queue=4)


def test_a_signal_closes_the_line_drains_it_then_ends_the_streams_and_a_second_signal_stops_at_once(monkeypatch):
    import signal
    from types import SimpleNamespace

    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from flux_infer import server
    from flux_infer.service import Service

    monkeypatch.setattr(server, "DOWNLOAD_GRACE_S", 0.0)  # no client is fetching a file here

    async def scenario():
        page = SimpleNamespace(stop_event=asyncio.Event())  # the mounted Gradio app's heartbeat switch
        service = Service(inference=None, max_queue=4)
        running = service.admit("gradio")
        await service.wait_turn(running)
        waiting = service.admit("openai")
        uvicorn_server = server.DrainingServer(uvicorn.Config(Starlette(routes=[Mount("/", app=page)])), service)
        uvicorn_server.loop = asyncio.get_running_loop()

        uvicorn_server.handle_exit(signal.SIGTERM, None)
        assert not service.ready
        with pytest.raises(Busy, match="shutting down"):
            service.admit("mcp")
        await _settle()
        for ticket in (running, waiting):  # both admitted before the signal: both are served
            assert not uvicorn_server.should_exit and not page.stop_event.is_set()
            await service.wait_turn(ticket)
            service.done(ticket)
        await uvicorn_server.draining
        assert uvicorn_server.should_exit and page.stop_event.is_set() and not uvicorn_server.force_exit

        uvicorn_server.handle_exit(signal.SIGTERM, None)
        assert uvicorn_server.force_exit

    run(scenario())
