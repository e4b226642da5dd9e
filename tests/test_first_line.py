"""flux_infer.errors.first_line: a library's exception in the one line a user is shown."""

from __future__ import annotations

from flux_infer.errors import LIMIT, first_line


def test_the_first_line_that_says_something():
    assert first_line(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later")) == \
        "CUDA error: out of memory"
    assert first_line(ValueError("\n  \n  backend='inductor' raised:  \nmore")) == "backend='inductor' raised:"
    assert first_line(KeyError("transformer.x.lora_A.weight")) == "'transformer.x.lora_A.weight'"


def test_an_empty_message_gives_the_exceptions_type():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(OSError("\n\n")) == "OSError"
    assert first_line(KeyError()) == "KeyError"


def test_a_long_line_is_cut_and_says_so():
    line = first_line(RuntimeError("x" * 5000 + "\nsecond"))
    assert len(line) == LIMIT and line.endswith("...") and line.startswith("x" * (LIMIT - 3))
    assert first_line(RuntimeError("y" * 50), limit=20) == "y" * 17 + "..."
    assert first_line(RuntimeError("y" * 20), limit=20) == "y" * 20
