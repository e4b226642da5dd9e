"""bench/gpu.py's own machinery on the CPU: step timing by kind, and a measurement that cannot run here."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import pytest
from conftest import ReplayedOnCPU

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_are_told_apart_by_whether_the_transformer_ran(gpu_bench, tiny_dir, tmp_path):
    common = dict(model=str(tiny_dir), device="cpu", size=256, steps=3, runs=1, step_times=True,
                  started=time.time())
    plain = gpu_bench.measure_one("--memory off", **common, image=str(tmp_path / "plain.png"))
    assert (plain["full_steps"], plain["skipped_steps"]) == (2, 0)  # steps 2..3: the first holds text encoding
    assert plain["full_step_s"] > 0 and plain["skipped_step_s"] is None
    assert plain["plan"] == "transformer unquantized, offload none" and plain["device"] == "cpu"
    # After the timings: an edit runs and a second image is cancelled (on a GPU, each followed by the
    # memory it left allocated; here there is none to read).
    assert plain["edit_s"] > 0 and plain["cancelled"] is True
    assert plain["held_after_gib"] == {"image": None, "edit": None, "cancel": None}
    assert "an edit (2 steps)" in gpu_bench.after_image_note(plain)
    assert "a second image cancelled after step 2" in gpu_bench.after_image_note(plain)
    # An unreachable threshold: every step after the first reuses the cached residual.
    cached = gpu_bench.measure_one("--memory off --cache fbcache:1000", **common, image=str(tmp_path / "cached.png"))
    assert (cached["full_steps"], cached["skipped_steps"]) == (0, 2)
    assert cached["cached_steps"] == 2
    # Each first image kept, and told from bf16 eager's: the same image is 0 levels away; the one
    # with two steps skipped is not.
    assert gpu_bench.image_difference(tmp_path / "plain.png", tmp_path / "plain.png") == {"mean": 0.0, "max": 0}
    skipped = gpu_bench.image_difference(tmp_path / "cached.png", tmp_path / "plain.png")
    assert skipped["mean"] > 0 and skipped["max"] >= 1
    assert "mean difference" in gpu_bench.row_notes({**cached, "per_step_s": 0.1, "image_vs_eager": skipped})


@pytest.mark.e2e  # a child process
def test_a_measurement_that_cannot_run_is_written_down_and_the_run_goes_on(gpu_bench, tmp_path):
    args = argparse.Namespace(out=tmp_path, scratch=tmp_path, model="random-small", device="cpu", size=256,
                              steps=2, runs=0, timeout=300, profile=False, only=None, deadline=None)
    run = gpu_bench.Run(args)
    assert run.measure("offload", "model-offload", "--offload model") is None
    report = (tmp_path / "results.md").read_text()
    assert "| model-offload | `--offload model` | could not run: " in report
    assert "--offload model moves weights between a GPU and the CPU: it needs a CUDA GPU" in report
    assert '"error"' in (tmp_path / "results.jsonl").read_text()


def test_a_measurement_past_its_timeout_is_written_down_with_what_it_printed(gpu_bench, tmp_path, monkeypatch):
    import subprocess

    def hangs(command, **kwargs):  # what subprocess.run raises: the output so far, as bytes
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=b"", stderr=b"building the pipeline\n")

    monkeypatch.setattr(gpu_bench.subprocess, "run", hangs)
    args = argparse.Namespace(out=tmp_path, scratch=tmp_path, model="random", device=None, size=1024, steps=28,
                              runs=3, timeout=240, profile=False, only=None, deadline=None)
    assert gpu_bench.Run(args).measure("compile", "fp8-compile", "--quantize fp8 --compile") is None
    assert "| fp8-compile | `--quantize fp8 --compile` | could not run: timed out after 240 s (--timeout) |" in (
        tmp_path / "results.md").read_text()
    assert "building the pipeline" in (tmp_path / "children.log").read_text()


def test_a_profiled_measurement_says_where_each_step_goes(gpu_bench, tiny_dir, tmp_path):
    profile = tmp_path / "profiles" / "presets-bf16.txt"
    row = gpu_bench.measure_one("--memory off", model=str(tiny_dir), device="cpu", size=256, steps=2, runs=1,
                                step_times=False, started=time.time(), profile=str(profile))
    per_step = row["profile_ms_per_step"]
    assert set(per_step) == {"matmul", "attention", "other"}
    assert per_step["matmul"] > 0 and per_step["attention"] > 0  # a CPU's aten::addmm and SDPA
    assert "aten::addmm" in profile.read_text() and row["profile_file"] == str(profile)
    assert row["peak_ram_gib"] > 0
    line = gpu_bench.preset_line(gpu_bench.Run(argparse.Namespace(out=tmp_path)), "bf16", {**row, "peak_smi_gib": None})
    assert f"matmul {per_step['matmul']:.1f}" in line
    # Only denoising steps are recorded (here the second of two), each against a steady image's
    # time a step (on a GPU, what is missing is the launches' waits).
    assert row["profiled_steps"] == 1 and "profile of 1 denoising steps" in line
    kernels, step = sum(per_step.values()), row["per_step_s"] * 1000
    assert f"kernels {kernels:.1f} of the {step:.1f} ms an image takes a step ({kernels / step:.0%} busy)" in line
    # A compiled row also says its recompilations, graph breaks and CUDA graphs recorded.
    compiled = {**row, "peak_smi_gib": None, "recompiles": 2, "graph_breaks": 0, "cuda_graphs": 1}
    assert "| 2 / 0 / 1 |" in gpu_bench.preset_line(gpu_bench.Run(argparse.Namespace(out=tmp_path)), "x", compiled)
    # With CUDA graphs, what the allocator reserved (their pool) beside what it allocated, and the
    # pool itself beside what --memory auto plans for it. Without graphs (as on this CPU) neither.
    assert row["graphs_pool_gib"] is None
    note = "the allocator's reserved peak 24.3 GiB (with the CUDA graphs' pool"
    assert note not in gpu_bench.row_notes({**compiled, "peak_reserved_gib": 24.3})
    graphed = gpu_bench.row_notes({**compiled, "peak_reserved_gib": 24.3, "graphs_pool_gib": 1.624})
    assert note in graphed
    assert f"the pool 1.62 GiB (--memory auto plans for {row['graphs_pool_planned_gib']} at 1024x1024)" in graphed


def test_plain_diffusers_load_is_measured_beside_ours(gpu_bench, tiny_dir):
    row = gpu_bench.measure_one("", model=str(tiny_dir), device="cpu", size=256, steps=2, runs=0,
                                step_times=False, started=time.time(), plain=True)
    assert row["plan_reason"].startswith("plain diffusers") and row["build_s"] > 0 and row["first_s"] > 0


def test_the_served_direct_measurement_says_what_previews_and_encoding_add(gpu_bench, tiny_dir, tmp_path):
    from flux_infer.random_weights import save_taef1

    taef1 = save_taef1(tmp_path / "taef1")
    row = gpu_bench.measure_one("", model=str(tiny_dir), device="cpu", size=256, steps=2, runs=0,
                                step_times=False, started=time.time(), taef1=str(taef1))
    costs = row["serving_costs"]
    assert set(costs) == {"latent preview", "taef1 preview", "taef1 preview, pooled latents",
                          "taef1 preview, NCHW weights", "vae decode", "vae decode, channels_last", "png encode",
                          "webp encode"}
    assert all(ms > 0 for ms in costs.values())
    # TAEF1 given a quarter of the latents does a quarter of its convolutions
    assert costs["taef1 preview, pooled latents"] < costs["taef1 preview"]
    table = gpu_bench.serving_costs_table(costs, row["median_s"], steps=2).splitlines()
    taef1_line = next(line for line in table if line.startswith("| taef1 preview |"))
    assert f"{costs['taef1 preview'] * 2:.0f} (2x)" in taef1_line
    assert next(line for line in table if line.startswith("| png encode |")).count("(1x)") == 1
    assert "(1x)" in next(line for line in table if line.startswith("| vae decode |"))


@pytest.mark.e2e  # a server
def test_the_served_time_is_split_by_gradios_own_timings(gpu_bench, tiny_dir, tmp_path):
    common = gpu_bench.bench_module("common")
    server = common.Server(tiny_dir, tmp_path, ["--preview", "latent"], env=common.GRADIO_PROFILING)
    try:
        client = server.client()
        times = []
        for seed in range(2):
            began = time.perf_counter()
            client.predict("a cat", seed, False, 256, 256, 3.5, 3, api_name="/infer")
            times.append(time.perf_counter() - began)
        traces = common.gradio_traces(server, 2)
        # Each event holds the handler (the generation and its previews) and the postprocessing of
        # every yield (the previews' files, then the final image's); the client's time holds the
        # event and more.
        for took, trace in zip(times, traces):
            assert 0 < trace["fn_call_ms"] and 0 < trace["postprocess_save_pil_to_cache_ms"] < trace["postprocess_ms"]
            assert trace["fn_call_ms"] + trace["postprocess_ms"] < trace["total_ms"] < took * 1000
        split = common.gradio_split(times, server)
        assert 0 < split["handler_s"] < split["event_s"] < statistics.median(times)
        assert split["postprocess_ms"] > split["final_image_ms"] > 0 and split["outside_ms"] > 0
        with pytest.raises(RuntimeError, match="Gradio kept 2 timings for 3 events"):
            common.gradio_split([*times, 1.0], server)
    finally:
        server.stop()


def test_a_compiling_measurement_counts_its_recompiles_graph_breaks_and_cuda_graphs(gpu_bench, tmp_path, monkeypatch,
                                                                                     caplog):
    import json
    import logging
    import subprocess

    import torch

    with caplog.at_level(logging.INFO, logger="flux_infer.cuda_graphs"):  # the line as it is logged
        ReplayedOnCPU(lambda hidden_states: hidden_states * 2)(hidden_states=torch.ones(1, 4))
    seen = {}

    def child(command, **kwargs):  # a compiling child: its TORCH_LOGS lines on stderr, its row on stdout
        if command[0] == "nvidia-smi":
            raise OSError("no nvidia-smi here")
        seen.update(env=kwargs["env"], spec=json.loads(command[-1]))
        stderr = ("V1126 [__recompiles] Recompiling function forward in transformer_flux.py:383\n"
                  "V1126 [__graph_breaks] Graph break in user code at hooks.py:217\n"
                  f"INFO flux_infer.cuda_graphs: {caplog.records[0].getMessage()}\n")
        return subprocess.CompletedProcess(command, 0, json.dumps({"median_s": 1.0}) + "\n", stderr)

    monkeypatch.setattr(gpu_bench.subprocess, "run", child)
    args = argparse.Namespace(out=tmp_path, scratch=tmp_path, model="random", device=None, size=1024, steps=28,
                              runs=3, timeout=240, profile=["compile"], only=None, deadline=None)
    run = gpu_bench.Run(args)
    row = run.measure("compile", "fp8-compile", "--quantize fp8 --compile")
    assert (row["recompiles"], row["graph_breaks"], row["cuda_graphs"]) == (1, 1, 1)
    assert seen["env"]["TORCH_LOGS"] == "recompiles,graph_breaks"
    assert seen["spec"]["stacks_after"] == 225  # stacks written 15 s before --timeout
    assert seen["spec"]["profile"] == str(tmp_path / "profiles" / "compile-fp8-compile.txt")
    run.measure("memory", "8 GiB", "--gpu-memory 8")  # --profile compile: the caps are not profiled
    assert seen["spec"]["profile"] is None and "TORCH_LOGS" not in seen["env"]


def test_each_goal_names_the_fastest_preset_that_meets_it(gpu_bench, tmp_path, monkeypatch):
    seconds = {"bf16": 5.3, "compile": 4.0, "compile-autotune": 3.8, "fp8-compile": 2.6,
               "fp8-compile-autotune": 2.3, "compile-fused": None}  # None: could not run

    order = []

    def measure(self, part, name, flags, **_):
        order.append(name)
        if seconds[name] is None:
            return None
        self.rows[name] = {"median_s": seconds[name]}
        return self.rows[name]

    monkeypatch.setattr(gpu_bench.Run, "measure", measure)
    monkeypatch.setattr(gpu_bench, "preset_line", lambda run, name, row: f"| {name} |")
    args = argparse.Namespace(out=tmp_path, only=list(reversed(seconds)))
    gpu_bench.part_presets(gpu_bench.Run(args), "compile", gpu_bench.PARTS["compile"])
    assert order == ["bf16", *reversed(list(seconds)[1:])]  # the baseline first, then in --only's order
    report = (tmp_path / "results.md").read_text()
    assert "fastest --compile, bf16: 3.800 s, compile-autotune (goal on an H100: <= 3.9 s)" in report
    assert "fastest fp8: 2.300 s, fp8-compile-autotune (goal on an H100: <= 2.4 s)" in report


def test_every_measured_flag_set_is_one_the_cli_accepts(gpu_bench):
    """A typo in a preset would cost a child's GPU minutes: each flag set parses into Options as the
    child parses it, and each attention backend is one diffusers has."""
    import shlex

    from diffusers.models.attention_dispatch import AttentionBackendName

    from flux_infer import cli, tuning

    flag_sets = [*gpu_bench.PRESETS.values(), *(f"--memory off {flags}" for flags in gpu_bench.CACHES.values()),
                 *(f"--gpu-memory {gpu_bench.LEAN_CAP_GIB} {flags}" for flags in gpu_bench.LEAN_PLANS.values()),
                 *(f"--gpu-memory {cap}" for cap in gpu_bench.CAPS_GIB)]
    backends = {name.value for name in AttentionBackendName} | {tuning.FLOAT8_ATTENTION}
    for flags in flag_sets:
        options = cli._options(cli._parser().parse_args(["generate", "x", *shlex.split(flags)]))
        assert options.attention is None or options.attention in backends, flags
    for part, names in gpu_bench.PARTS.items():
        assert set(names) <= set(gpu_bench.PRESETS), part
    assert set(gpu_bench.COMPILE_PRESETS) | set(gpu_bench.FP8_PRESETS) <= set(gpu_bench.PARTS["compile"]) | set(
        gpu_bench.PARTS["presets"])


def test_a_failed_child_is_summed_up_by_its_exception_not_torchs_advice(gpu_bench):
    stderr = ("INFO flux_infer.loading: memory: ...\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
              "torch._dynamo.exc.TorchRuntimeError: RuntimeError when making fake tensor call\n"
              "  Explanation: Dynamo failed to run FX node with fake tensors: No viable backend\n"
              "  Hint: Your code may result in an error when running in eager.\n\n"
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n")
    assert gpu_bench.failure_reason(stderr, 1) == (
        "torch._dynamo.exc.TorchRuntimeError: RuntimeError when making fake tensor call "
        "Explanation: Dynamo failed to run FX node with fake tensors: No viable backend")
    assert gpu_bench.failure_reason("loading\nValueError: width must be 256 or more\n", 1) == (
        "ValueError: width must be 256 or more")
    assert gpu_bench.failure_reason("a line\nkilled\n", -9) == "killed"
    assert gpu_bench.failure_reason("", 3) == "exit 3"
    # a timed-out child's last line is the timeout, whatever it printed before
    assert gpu_bench.failure_reason("RuntimeError: earlier\ntimed out after 200 s (--timeout)", 124) == (
        "timed out after 200 s (--timeout)")


def test_a_deadline_bounds_each_child_and_starts_none_it_cannot_finish(gpu_bench, tmp_path, monkeypatch):
    import subprocess

    timeouts = []

    def hangs(command, **kwargs):
        if command[0] == "nvidia-smi":
            raise OSError("no nvidia-smi here")
        timeouts.append(kwargs["timeout"])
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=b"", stderr=b"compiling\n")

    monkeypatch.setattr(gpu_bench.subprocess, "run", hangs)
    args = argparse.Namespace(out=tmp_path, scratch=tmp_path, model="random", device=None, size=1024, steps=28,
                              runs=3, timeout=200, profile=None, only=None, deadline=300)
    clock = [1000.0]
    monkeypatch.setattr(gpu_bench.time, "monotonic", lambda: clock[0])
    run = gpu_bench.Run(args)
    run.measure("compile", "compile", "--compile")  # 300 s left: --timeout bounds it
    clock[0] += 150
    run.measure("compile", "fp8-compile", "--quantize fp8 --compile")  # 150 s left: the deadline does
    clock[0] += 125
    assert run.measure("memory", "24 GiB", "--gpu-memory 24") is None  # 25 s left: not started
    assert timeouts == [200, 300 - 150 - gpu_bench.DEADLINE_MARGIN_S]
    report = (tmp_path / "results.md").read_text()
    assert "could not run: timed out after 200 s (--timeout)" in report
    assert "could not run: timed out after 140 s (--deadline)" in report
    assert "| 24 GiB | `--gpu-memory 24` | not measured: --deadline 300 s reached |" in report
    assert report.count("compiling") == 0 and (tmp_path / "children.log").read_text().count("compiling") == 2


def test_a_pipeline_save_past_its_time_is_written_down_and_leaves_no_half_folder(gpu_bench, tmp_path, monkeypatch):
    import subprocess

    def writes_then_hangs(command, **kwargs):
        folder = Path(command[command.index("--save") + 1])
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")  # written first; the weights never came
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(gpu_bench.subprocess, "run", writes_then_hangs)
    args = argparse.Namespace(out=tmp_path / "out", scratch=str(tmp_path / "scratch"), model="random",
                              allow_cpu=False, timeout=200, deadline=None)
    gpu_bench.part_cold(gpu_bench.Run(args))
    report = (tmp_path / "out" / "results.md").read_text()
    assert "could not save the pipeline: timed out after 200 s (--timeout)" in report
    assert "raw read" not in report  # nothing measured on a folder that is not whole
    assert not (tmp_path / "scratch" / "flux-random-pipeline").exists()


def test_the_cards_clock_and_power_are_read_while_it_is_busy(gpu_bench, monkeypatch):
    import subprocess

    # nvidia-smi's answers: idle before the measurement, then idle, busy, busy without a power reading.
    answers = iter(["1024, 0, 1980, 90.5", "2048, 3, 1980, 120.0", "35840, 100, 1755, 690.2",
                    "36864, 97, 1650, [N/A]"])
    monkeypatch.setattr(gpu_bench.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(
        command, 0, next(answers) + "\n", ""))
    smi = gpu_bench.SmiPeak()  # reads the memory used before
    for _ in range(3):
        smi.take(smi._sample())
    assert smi.peak == pytest.approx(35.0)  # GiB above the 1 GiB used before
    figures = smi.busy_figures()
    assert figures == {"busy_sm_mhz": pytest.approx(1702.5), "busy_sm_mhz_min": 1650, "busy_watts": 690.2,
                       "busy_samples": 2}
    note = gpu_bench.row_notes({**figures})
    assert "while the card was busy (2 samples of nvidia-smi): SM clock 1702 MHz (lowest 1650), power 690 W" in note
    idle = gpu_bench.SmiPeak.__new__(gpu_bench.SmiPeak)  # no busy sample: no line
    idle.busy = []
    assert idle.busy_figures() == {} and gpu_bench.row_notes({}) == ""


@pytest.mark.e2e  # compiles the tiny transformer (or takes it from inductor's cache, as the second time does)
def test_a_compiled_measurement_says_which_graphs_came_from_inductors_cache(gpu_bench, tiny_dir):
    # On the GPU machine every child of a run shares inductor's cache on disk: a preset compiled as an
    # earlier one was (fp8-row with and without CUDA graphs) warms up from it, and its row says so.
    import torch

    common = dict(model=str(tiny_dir), device="cpu", size=256, steps=2, runs=0, step_times=False, started=time.time())
    torch._dynamo.reset()
    first = gpu_bench.measure_one("--memory off --compile", **common)
    torch._dynamo.reset()
    second = gpu_bench.measure_one("--memory off --compile --compile-mode reduce-overhead", **common)
    # The double block, the single block and the decoder: compiled then (or cached by an earlier test), cached now.
    assert sum(first["warm_up_graphs"].values()) == 3
    assert second["warm_up_graphs"] == {"compiled": 0, "cached": 3}
    assert ("its warm-up compiled 0 graphs and took 3 from inductor's cache"
            in gpu_bench.row_notes({**second, "per_step_s": 0.1}))
    assert "inductor's cache" not in gpu_bench.row_notes({**second, "warm_up_graphs": {"compiled": 3, "cached": 0}})
    assert gpu_bench.measure_one("--memory off", **common)["warm_up_graphs"] is None
