"""Cost of live previews: one generation through the server with previews off and with each decoder.

Three servers on the same tiny weights (`--preview none`, `latent`, `taef1` with a tiny random
TAEF1), called in turn at 1024x1024 and 28 steps by two kinds of consumer:
- `page`: what the browser does: read the queue's event stream and fetch every preview image
  over one keep-alive connection;
- `gradio_client`: submit(), iterating every output. gradio_client downloads each preview with a
  new HTTP client (and a new TLS context, even for http://), which costs tens of ms of CPU per file:
  on a 2-core CPU that competes with the denoising itself.
Prints medians and ratios to `none`. Goal for latent: at most 1.03.

    python bench/previews.py [--runs 7] [--model DIR] [--taef1 DIR_OR_REPO] [--decoders latent,taef1]
                             [--no-client] [--torch-threads N]

On a CPU-only machine the tiny model's denoising takes every core, so each preview's few ms of
serving (Gradio's postprocess, the event stream, the image fetch) stall it twice over;
`--torch-threads 1` leaves a core to serving, which is what a GPU box does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import uuid
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (PROMPT, Server, add_thread_option, apply_thread_option,  # noqa: E402
                    download_folders_removed, interleaved, report)


def page_outputs(browser, data):
    """Join the queue as the page does, fetch each image the event stream announces; yield its URL."""
    config = browser.get("config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "infer")
    session = uuid.uuid4().hex[:11]
    browser.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                "event_data": None, "trigger_id": None}).raise_for_status()
    with browser.stream("GET", f"gradio_api/queue/data?session_hash={session}") as events:
        for line in events.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") in ("process_generating", "process_completed"):
                for url in set(re.findall(r'"(http[^"]*/gradio_api/file=[^"]+)"', line)):
                    browser.get(url).raise_for_status()
                    yield url
            if message.get("msg") == "process_completed":
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--model", default=None, help="pipeline folder or repo id (default: a fresh tiny one)")
    parser.add_argument("--taef1", default=None, help="TAEF1 folder or repo id (default: a tiny random one)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--decoders", default="latent,taef1",
                        help="comma-separated decoders to compare with `none` (default: latent,taef1)")
    parser.add_argument("--no-client", action="store_true", help="skip the gradio_client comparison")
    add_thread_option(parser)
    args = parser.parse_args()
    apply_thread_option(args)
    decoders = [d for d in args.decoders.split(",") if d]
    if not set(decoders) <= {"latent", "taef1"}:
        raise SystemExit("--decoders takes latent and/or taef1")

    import httpx

    from flux_infer.tiny import make_tiny, make_tiny_taef1

    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-previews-"))
    model = args.model or make_tiny(workdir / "tiny", seed=0)
    taef1 = args.taef1 or make_tiny_taef1(workdir / "taef1")
    modes = {"none": [], "latent": [], "taef1": ["--taef1", str(taef1)]}
    modes = {mode: extra for mode, extra in modes.items() if mode == "none" or mode in decoders}
    servers = {mode: Server(model, workdir / mode, ["--preview", mode, *extra], name=mode)
               for mode, extra in modes.items()}
    try:
        data = [PROMPT, 0, False, args.size, args.size, 3.5, args.steps]
        page_calls, client_calls, counts, cpu = {}, {}, {}, {}
        for mode, server in servers.items():
            client = server.client()
            browser = httpx.Client(base_url=server.url, timeout=300)

            def page(seed: int, browser=browser, mode=mode, server=server) -> None:
                before = server.cpu_seconds()
                counts[mode] = len(set(page_outputs(browser, [*data[:1], seed, *data[2:]])))
                cpu.setdefault(mode, []).append(server.cpu_seconds() - before)

            def via_client(seed: int, client=client) -> None:
                list(client.submit(*data[:1], seed, *data[2:], api_name="/infer"))

            page_calls[f"page, previews {mode}"] = page
            client_calls[f"gradio_client, previews {mode}"] = via_client
        threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
        print(f"{args.size}x{args.size}, {args.steps} steps, {args.runs} runs each, torch threads {threads}; "
              "idle servers paused")
        report(interleaved(page_calls, args.runs, servers={f"page, previews {m}": s for m, s in servers.items()}),
               "page, previews none", {"page, previews latent": 1.03})
        print(f"images per generation: {counts}")
        base_cpu = statistics.median(cpu["none"])
        for mode in decoders:
            extra = statistics.median(cpu[mode]) - base_cpu
            print(f"server CPU per generation, {mode}: +{extra:.2f} s over none, "
                  f"{1000 * extra / (counts[mode] - 1):.0f} ms per preview")
        if args.no_client:
            return
        report(interleaved(client_calls, args.runs,
                           servers={f"gradio_client, previews {m}": s for m, s in servers.items()}),
               "gradio_client, previews none", {})
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    with download_folders_removed():
        main()
