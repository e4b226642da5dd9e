"""The transformer's forward replayed from CUDA graphs (`--compile-mode reduce-overhead` or `max-autotune`).

torch.compile compiles the transformer's blocks one by one (about a minute for FLUX.1-dev on an
H100); the whole forward, the blocks' compiled kernels and diffusers' eager code around them, is
then captured with `torch.cuda.graph` once per shape of its inputs and replayed at every step: one
launch for the thousands of kernels of a step, which the GPU otherwise waits on (a fifth of an fp8
step on an H100: bench/RESULTS.md). torch's own CUDA graphs for compiled code (inductor's CUDA graph
trees) cannot chain blocks compiled one by one (pytorch/pytorch#152887) and would need the whole
transformer compiled as one graph, several times slower to compile.

A replay reads its inputs from the tensors it was captured with and writes its outputs to the same
tensors every time: each call copies its inputs into them and returns copies of the outputs. What a
replay cannot see stays as it was at the capture: the weights' addresses (no offloading), Python
state read by hooks (no step cache) and a LoRA's scale unless it is folded into weights that are
updated in place (`loras.LoraAdapters`' compiled slots are).
"""

from __future__ import annotations

import logging
import time

from flux_infer.errors import first_line

log = logging.getLogger(__name__)


class GraphCaptureError(RuntimeError):
    """The forward could not be recorded as a CUDA graph (something in it waits on the GPU, or copies
    from the CPU); the message says what to run instead."""


def _shape_key(leaves: list, spec) -> tuple:
    """What decides a graph, from the call's flattened arguments: their structure, each tensor's shape,
    dtype and device, and every other argument's value (a replay cannot change them)."""
    import torch

    return spec, tuple((tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else leaf
                       for leaf in leaves)


class GraphedForward:
    """`forward` (a module's bound forward) replayed from one CUDA graph per shape of its inputs.

    Its graphs share one memory pool: they never run at once (one generation at a time) and each
    call copies its outputs out before the next replay, so one graph may reuse another's memory.
    """

    def __init__(self, forward, *, name: str = "the transformer"):
        self._forward = forward
        self._name = name
        # shape key -> (the recorded input tensors, in the order of the call's flattened arguments,
        # None for the others; the recorded outputs; the replay)
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self.pool_bytes = 0  # what the graphs' pool holds: reserved, and usable by nothing else

    @property
    def recorded(self) -> int:
        return len(self._graphs)

    def __call__(self, *args, **kwargs):
        import torch
        from torch.utils._pytree import tree_flatten, tree_map_only

        leaves, spec = tree_flatten((args, kwargs))  # once a step: the key and the copies both read it
        key = _shape_key(leaves, spec)
        if key not in self._graphs:
            self._graphs[key] = self._record(args, kwargs, leaves)
        inputs, outputs, replay = self._graphs[key]
        for static, given in zip(inputs, leaves):
            if static is not None:
                static.copy_(given)
        replay()
        return tree_map_only(torch.Tensor, torch.clone, outputs)

    def _record(self, args: tuple, kwargs: dict, leaves: list) -> tuple:
        import torch
        from torch.utils._pytree import tree_leaves, tree_map_only

        started = time.perf_counter()
        args, kwargs = tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        try:
            outputs, replay = self._capture(lambda: self._forward(*args, **kwargs))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            log.error("recording %s's CUDA graph failed", self._name, exc_info=True)
            raise GraphCaptureError(f"could not record {self._name} as a CUDA graph: {first_line(err)} (the log "
                                    "has torch's account); use --compile-mode default or "
                                    "max-autotune-no-cudagraphs") from None
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        sample = kwargs.get("hidden_states", tensors[0] if tensors else None)
        log.info("recorded %s's CUDA graph for inputs of %s in %.1f s (%d recorded)", self._name,
                 "x".join(map(str, sample.shape)) if sample is not None else "no tensor",
                 time.perf_counter() - started, len(self._graphs) + 1)
        inputs = [leaf if isinstance(leaf, torch.Tensor) else None for leaf in tree_leaves((args, kwargs))]
        return inputs, outputs, replay

    def _capture(self, run) -> tuple:
        """Run `run` once on a side stream (torch.compile compiles, CUDA loads its kernels, cuBLAS and
        cuDNN pick theirs: none of which may happen during a capture), then capture it. Returns its
        outputs (the tensors every replay writes) and the replay."""
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local, as inductor's own CUDA graphs capture: another thread's CUDA calls do not
        # invalidate this thread's capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            # Measured inside: entering empties the allocator's cache. What a capture allocates comes
            # from the pool, which grows by what earlier graphs' memory could not hold.
            reserved = torch.cuda.memory_reserved()
            outputs = run()
        self.pool_bytes += torch.cuda.memory_reserved() - reserved
        self._pool = graph.pool()
        return outputs, graph.replay
