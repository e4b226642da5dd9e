"""Bad input from gradio_client and raw HTTP gets a message naming what to fix; the server keeps serving."""

from __future__ import annotations

import json

import pytest
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.e2e  # starts servers

GOOD = dict(prompt="a red cube", seed=5, randomize_seed=False, width=256, height=256, guidance_scale=3.5,
            num_inference_steps=1)

BAD = [
    (dict(seed=-1), "seed must be a whole number between 0 and 2147483647, got -1"),
    (dict(seed=2147483648), "seed must be a whole number between 0 and 2147483647, got 2147483648"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(seed="lucky"), "seed must be a whole number between 0 and 2147483647, got the text 'lucky'"),
    (dict(width=4096), "width must be a number between 256 and 2048, got 4096"),
    (dict(height=16), "height must be a number between 256 and 2048, got 16"),
    (dict(width="wide"), "width must be a number between 256 and 2048, got the text 'wide'"),
    (dict(guidance_scale=0), "guidance_scale must be a number between 1 and 15, got 0"),
    (dict(guidance_scale=None), "guidance_scale must be a number between 1 and 15, got None"),
    (dict(num_inference_steps=0), "num_inference_steps must be a whole number between 1 and 50, got 0"),
    (dict(num_inference_steps=10_000), "num_inference_steps must be a whole number between 1 and 50, got 10000"),
    (dict(randomize_seed="maybe"), "randomize_seed must be true or false, got 'maybe'"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="x" * 20_000), "prompt is 20000 characters long; the limit is 10000"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))[:12] for c, _ in BAD])
def test_gradio_client_gets_a_clear_error(client, change, message):
    with pytest.raises(AppError) as caught:
        client.predict(**{**GOOD, **change}, api_name="/infer")
    assert message in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_server_keeps_serving_after_bad_input(client):
    for change, _ in BAD[:4]:
        with pytest.raises(AppError):
            client.predict(**{**GOOD, **change}, api_name="/infer")
    path, seed = client.predict(**GOOD, api_name="/infer")
    assert seed == 5 and path.endswith(".webp")


def _raw_call(server, data) -> tuple[int, str]:
    """Gradio's documented REST route: POST the values, then read the event stream."""
    posted = server.http.post("gradio_api/call/infer", json={"data": data}, timeout=30)
    if posted.status_code != 200:
        return posted.status_code, posted.text
    stream = server.http.get(f"gradio_api/call/infer/{posted.json()['event_id']}", timeout=120)
    return stream.status_code, stream.text


def _event(text: str) -> tuple[str, object]:
    lines = [line for line in text.splitlines() if line.strip()]
    kind = [line.removeprefix("event: ") for line in lines if line.startswith("event:")][-1]
    data = json.loads([line.removeprefix("data: ") for line in lines if line.startswith("data:")][-1])
    return kind, data


@pytest.mark.parametrize(
    "data, message",
    [
        (["x", "abc", True, 256, 256, 3.5, 1], "seed must be a whole number between 0 and 2147483647, got the text 'abc'"),
        (["x", 0, False, 256, 256, 3.5, [1, 2]], "num_inference_steps must be a whole number between 1 and 50, got [1, 2]"),
        ([None, 0, False, 256, 256, 3.5, 1], "prompt is empty"),
        ([{"a": 1}, 0, False, 256, 256, 3.5, 1], "prompt must be text, got dict"),
        (["x"], "needed: 7, got: 1"),
    ],
)
def test_raw_http_gets_a_clear_error(server, data, message):
    status, text = _raw_call(server, data)
    assert status == 200
    kind, payload = _event(text)
    assert kind == "error"
    assert message in payload["error"]
    assert "Traceback" not in text


def test_raw_http_good_call_after_bad_ones(server):
    _raw_call(server, ["x", -3, False, 256, 256, 3.5, 1])
    status, text = _raw_call(server, ["x", 9, False, 256, 256, 3.5, 1])
    kind, payload = _event(text)
    assert (status, kind) == (200, "complete")
    image, seed = payload
    assert seed == 9 and image["url"].endswith(".webp")


def test_malformed_json_is_a_4xx(server):
    response = server.http.post("gradio_api/call/infer", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert "Traceback" not in response.text
