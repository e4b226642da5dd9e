"""The few parts of Gradio flux-infer relies on beyond Gradio's public API, read here and only here.

- `Blocks.temp_file_sets`: the sets of temporary files (results, previews) Gradio made for an app,
  which the server sweeps on its own timer (web.sweep_files: Gradio's own sweep dies under load);
- `keep_in_cache` on a component: files Gradio must keep (cached examples);
- `gradio.utils.get_upload_folder()`, the components' `GRADIO_CACHE`: the folder Gradio serves
  files from. A file a handler returns from there is served as it is (not copied) and joins the
  component's temporary files, so web.sweep_files deletes it with Gradio's own (the previews);
- `stop_event` on the mounted Gradio app: set, it ends the session heartbeat streams every page and
  gradio_client keeps open (they never end on their own, so a shutdown would wait out uvicorn's
  whole graceful timeout for them).

`check()` runs when the page is built and `check_mounted()` when it is mounted: with a Gradio whose
internals differ they stop the server at start-up with the version to install, rather than failing
on the first request or at shutdown.
"""

from __future__ import annotations

# The Gradio releases these were read from and tested with (pyproject pins the same range).
REQUIRED = ">=6.31,<6.32"


class GradioMismatch(RuntimeError):
    """The installed Gradio lacks an internal this server relies on."""


def check(demo) -> None:
    """GradioMismatch, saying what to install, when `demo` lacks what this module reads."""
    missing = []
    if not isinstance(getattr(demo, "temp_file_sets", None), list):
        missing.append("Blocks.temp_file_sets")
    if not any(hasattr(block, "keep_in_cache") for block in demo.blocks.values()):
        missing.append("keep_in_cache on components")
    try:
        folder = cache_folder()
    except ImportError:
        missing.append("gradio.utils.get_upload_folder")
    else:
        if not any(getattr(block, "GRADIO_CACHE", None) == folder for block in demo.blocks.values()):
            missing.append("GRADIO_CACHE on components, the upload folder")
    _refuse(missing)


def cache_folder() -> str:
    """The folder Gradio serves files from (GRADIO_TEMP_DIR, else `gradio` in the system's temp folder)."""
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def _refuse(missing: list[str]) -> None:
    import gradio as gr

    if missing:
        raise GradioMismatch(f"this server needs gradio{REQUIRED}; gradio {gr.__version__} lacks {', '.join(missing)}: "
                             f"pip install 'gradio{REQUIRED}'")


def _stop_events(app) -> list:
    """The stop events of the Gradio apps mounted on `app` (a FastAPI app)."""
    import asyncio

    events = (getattr(getattr(route, "app", None), "stop_event", None) for route in app.routes)
    return [event for event in events if isinstance(event, asyncio.Event)]


def check_mounted(app) -> None:
    """GradioMismatch unless the Gradio app mounted on `app` has the stop event `end_streams` sets."""
    _refuse([] if _stop_events(app) else ["App.stop_event"])


def end_streams(app) -> None:
    """End the session heartbeat streams of the Gradio app mounted on `app`; call on its event loop."""
    for event in _stop_events(app):
        event.set()


def temp_file_sets(demo) -> list[set[str]]:
    """The live sets of the temporary files Gradio made for `demo`."""
    return demo.temp_file_sets


def kept_files(demo) -> set[str]:
    """Files Gradio must keep (cached examples)."""
    kept = set()
    for block in demo.blocks.values():
        kept.update(getattr(block, "keep_in_cache", ()))
    return kept
