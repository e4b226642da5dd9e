"""Attention in float8 (`--attention cudnn-fp8`): cuDNN's float8 flash attention on Hopper and newer GPUs.

Q, K and V are scaled into float8 (e4m3) with one scale each, the largest value of the tensor
mapped to float8's largest; cuDNN multiplies them in float8 on the tensor cores (twice bf16's rate),
the softmax's probabilities in float8 too, and writes the output in float8, scaled by V's scale (no
output can be larger than V's largest value). That is where a float8-quantized FLUX.1-dev still
ran in bf16: its attention was a fifth of a step on an H100 (bench/RESULTS.md).

cuDNN's graph API comes from NVIDIA's `nvidia-cudnn-frontend` package (Python bindings only; the
cuDNN library is torch's own). The kernel runs as the custom op `flux_infer::cudnn_fp8_attention`,
which torch.compile leaves whole (the scaling around it compiles with the block) and a CUDA graph
records: its cuDNN graph is built at a shape's first call, on the call's stream, before any capture.
A shape cuDNN has no graph for is served by torch's SDPA (said once in the log); start-up's test
refuses the option if cuDNN cannot run at all.

`Float8AttnProcessor` is diffusers' `FluxAttnProcessor` with this attention in place of
`dispatch_attention_fn`: diffusers' attention backends are a closed set.
"""

from __future__ import annotations

import functools
import logging

from flux_infer.errors import first_line

log = logging.getLogger(__name__)

PACKAGE = "nvidia-cudnn-frontend"
MIN_CAPABILITY = (9, 0)  # cuDNN's float8 flash attention: Hopper and newer
FLOAT8_MAX = 448.0  # the largest float8 e4m3 value
AMAX_FLOOR = 1e-6  # a tensor of zeros still gets a finite scale
# The softmax's probabilities (0 to 1) scaled into float8: 1 becomes float8's largest.
PROBABILITY_SCALE = FLOAT8_MAX
# Start-up's test: the most the output may differ from torch's SDPA, |difference| / |SDPA|, on random
# inputs. float8's rounding of Q, K, V, the probabilities and the output comes to a few percent; a
# scale taken the wrong way round, to 100% or more.
TOLERANCE = 0.25


class Float8AttentionUnavailable(RuntimeError):
    """Float8 attention cannot run here; the message says why."""


def check_supported(device: str, dtype) -> None:
    """Raise Float8AttentionUnavailable unless cuDNN's float8 attention can run on `device` in `dtype`."""
    import torch

    if not device.startswith("cuda"):
        raise Float8AttentionUnavailable("it needs a CUDA GPU of compute capability 9.0 or newer (Hopper, Blackwell)")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < MIN_CAPABILITY:
        raise Float8AttentionUnavailable(f"cuDNN's float8 flash attention needs compute capability 9.0 or newer "
                                         f"(Hopper, Blackwell); this GPU has {capability[0]}.{capability[1]}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise Float8AttentionUnavailable(f"it runs bfloat16 or float16 models, not {str(dtype).removeprefix('torch.')}")
    try:
        import cudnn  # noqa: F401
    except ImportError:
        raise Float8AttentionUnavailable(f"the {PACKAGE} package is not installed: pip install "
                                         "'flux-infer[gpu]'") from None


def to_float8(x):
    """`x` in float8 e4m3 with one scale for the tensor: (x * scale in float8, scale, 1 / scale), the
    scales as float32 tensors of shape (1, 1, 1, 1), as cuDNN takes them."""
    import torch

    amax = x.abs().amax().float().clamp(min=AMAX_FLOOR).reshape(1, 1, 1, 1)
    scale = FLOAT8_MAX / amax
    scaled = (x.float() * scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    return scaled, scale, amax / FLOAT8_MAX


def attention(query, key, value):
    """Scaled dot-product attention of (batch, sequence, heads, head_dim) tensors, as diffusers'
    `dispatch_attention_fn` takes and returns them, computed in float8 by cuDNN (after `register()`)."""
    import torch

    q, _, descale_q = to_float8(query)
    k, _, descale_k = to_float8(key)
    v, scale_v, descale_v = to_float8(value)
    # float8, scaled by V's scale (the op is looked up, not registered, here: torch.compile traces this)
    out = torch.ops.flux_infer.cudnn_fp8_attention(q, k, v, descale_q, descale_k, descale_v, scale_v)
    return (out.float() * descale_v).to(query.dtype)


def relative_error(device: str, dtype, heads: int, head_dim: int, tokens: int = 512) -> float:
    """How far float8 attention is from torch's SDPA on random inputs: |difference| / |SDPA| over the
    whole output (see TOLERANCE)."""
    import torch

    register()
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    try:
        if q.is_cuda:  # cuDNN's own error if it has no graph here, rather than torch's SDPA standing in
            _graph(tuple(q.shape), *(q.stride(),) * 4, q.device, strict=True)
        with torch.no_grad():
            got = attention(q, k, v).float()
    except Exception as err:  # cuDNN's own errors are no RuntimeError (cudnnGraphNotSupportedError)
        log.error("cuDNN's float8 attention failed on a test", exc_info=True)
        raise Float8AttentionUnavailable(f"cuDNN said {first_line(err)}") from None
    want = _sdpa(q, k, v).float()
    return float((got - want).norm() / want.norm())


def _sdpa(query, key, value):
    """torch's SDPA on (batch, sequence, heads, head_dim) tensors."""
    import torch

    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)))
    return out.transpose(1, 2)


# -- the cuDNN graph, as a custom op ---------------------------------------------------------------

@functools.cache
def register():
    """Register the custom op `flux_infer::cudnn_fp8_attention` (once); returns it as torch.ops has it."""
    import torch

    op = torch.library.custom_op("flux_infer::cudnn_fp8_attention", run, mutates_args=(), device_types="cuda",
                                 schema="(Tensor q, Tensor k, Tensor v, Tensor descale_q, Tensor descale_k, "
                                        "Tensor descale_v, Tensor scale_o) -> Tensor")
    op.register_fake(lambda q, k, v, descale_q, descale_k, descale_v, scale_o: torch.empty_like(q))
    return torch.ops.flux_infer.cudnn_fp8_attention.default


def run(q, k, v, descale_q, descale_k, descale_v, scale_o):
    """The op's CUDA kernel: cuDNN's graph for this shape and layout; where cuDNN has none, torch's SDPA
    on the float8 inputs (so a new image size is served, in bf16's time). The output is in float8,
    scaled by `scale_o`, either way."""
    import torch

    if not q.shape == k.shape == v.shape:
        raise ValueError(f"float8 attention takes Q, K and V of one shape, got {q.shape}, {k.shape}, {v.shape}")
    # cuDNN reads any strides but the head dimension's, which must be 1.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    graph = _graph(tuple(q.shape), q.stride(), k.stride(), v.stride(), out.stride(), q.device)
    if graph is None:
        return _with_sdpa(q, k, v, descale_q, descale_k, descale_v, scale_o, out)
    graph.run(q, k, v, descale_q, descale_k, descale_v, scale_o, out)
    return out


def _with_sdpa(q, k, v, descale_q, descale_k, descale_v, scale_o, out):
    """What the cuDNN graph computes, by torch's SDPA in bf16 (the probabilities are not rounded to float8)."""
    import torch

    q, k, v = ((t.float() * descale).to(torch.bfloat16)
               for t, descale in ((q, descale_q), (k, descale_k), (v, descale_v)))
    return out.copy_((_sdpa(q, k, v).float() * scale_o).clamp(-FLOAT8_MAX, FLOAT8_MAX))


def _cudnn_layout(shape: tuple, stride: tuple) -> tuple[list, list]:
    """A (batch, sequence, heads, head_dim) tensor's dims and strides as cuDNN's attention names them:
    (batch, heads, sequence, head_dim)."""
    batch, sequence, heads, width = shape
    return [batch, heads, sequence, width], [stride[0], stride[2], stride[1], stride[3]]


class _Graph:
    """One cuDNN float8 attention graph: built for one shape and layout, run on the caller's stream."""

    SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")

    def __init__(self, shape: tuple, strides: dict, device):
        import torch

        with torch.cuda.device(device):  # the handle and the plans are the device's
            self._build(shape, strides)
        # Kept with the graph, so that a CUDA graph's capture allocates none of them.
        scalar = dict(device=device, dtype=torch.float32)
        self.descale_s = torch.full((1, 1, 1, 1), 1 / PROBABILITY_SCALE, **scalar)
        self.scale_s = torch.full((1, 1, 1, 1), PROBABILITY_SCALE, **scalar)
        self.amax_values = (torch.empty((1, 1, 1, 1), **scalar), torch.empty((1, 1, 1, 1), **scalar))
        self.workspace = torch.empty(self.graph.get_workspace_size(), device=device, dtype=torch.uint8)
        self.stream = None

    def _build(self, shape: tuple, strides: dict) -> None:
        import cudnn

        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        self.handle = cudnn.create_handle()
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        tensors = {}
        for name in ("q", "k", "v"):
            dims, stride = _cudnn_layout(shape, strides[name])
            tensors[name] = graph.tensor(name=name, dim=dims, stride=stride, data_type=e4m3)
        for name in self.SCALARS:
            tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        out, _, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"], k=tensors["k"], v=tensors["v"], descale_q=tensors["descale_q"],
            descale_k=tensors["descale_k"], descale_v=tensors["descale_v"], descale_s=tensors["descale_s"],
            scale_s=tensors["scale_s"], scale_o=tensors["scale_o"], is_inference=True,
            attn_scale=shape[-1] ** -0.5, use_causal_mask=False, name="fp8_attention")
        dims, stride = _cudnn_layout(shape, strides["out"])
        out.set_output(True).set_dim(dims).set_stride(stride).set_data_type(e4m3)
        for amax in (amax_s, amax_o):  # the probabilities' and the output's largest values, unused here
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.tensors, self.out, self.amax = graph, tensors, out, (amax_s, amax_o)

    def run(self, q, k, v, descale_q, descale_k, descale_v, scale_o, out) -> None:
        import cudnn
        import torch

        stream = torch.cuda.current_stream(q.device).cuda_stream
        if stream != self.stream:  # a CUDA graph's capture runs on a stream of its own
            cudnn.set_stream(handle=self.handle, stream=stream)
            self.stream = stream
        t = self.tensors
        self.graph.execute({t["q"]: q, t["k"]: k, t["v"]: v, t["descale_q"]: descale_q, t["descale_k"]: descale_k,
                            t["descale_v"]: descale_v, t["descale_s"]: self.descale_s, t["scale_s"]: self.scale_s,
                            t["scale_o"]: scale_o, self.out: out, self.amax[0]: self.amax_values[0],
                            self.amax[1]: self.amax_values[1]}, self.workspace, handle=self.handle)


# (shape, strides, device) -> its graph, or None where cuDNN has none (said once in the log)
_GRAPHS: dict[tuple, _Graph | None] = {}


def _graph(shape: tuple, q_stride: tuple, k_stride: tuple, v_stride: tuple, out_stride: tuple, device, *,
           strict: bool = False) -> _Graph | None:
    """The cuDNN graph for this shape and layout, built at its first call. `strict`: raise cuDNN's
    error rather than keep None for it (start-up's test: cuDNN works here at all)."""
    key = (shape, q_stride, k_stride, v_stride, out_stride, device)
    if key not in _GRAPHS or (strict and _GRAPHS[key] is None):
        log.info("building cuDNN's float8 attention for %s", "x".join(map(str, shape)))
        try:
            _GRAPHS[key] = _Graph(shape, dict(q=q_stride, k=k_stride, v=v_stride, out=out_stride), device)
        except Exception as err:  # cuDNN's errors are no RuntimeError: cudnnGraphNotSupportedError and others
            if strict:
                raise
            log.warning("cuDNN has no float8 attention for %s (%s): attention at this size runs in bf16",
                        "x".join(map(str, shape)), first_line(err))
            _GRAPHS[key] = None
    return _GRAPHS[key]


# -- diffusers' processor ----------------------------------------------------------------------------

def processor(attention_fn=attention):
    """A FluxAttnProcessor (diffusers 0.42's steps) that computes its attention with `attention_fn`,
    float8 by default, where diffusers' calls `dispatch_attention_fn`."""
    import torch

    register()
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    class Float8AttnProcessor(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None:
                raise ValueError("float8 attention takes no attention mask (FluxPipeline passes none)")
            query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
                attn, hidden_states, encoder_hidden_states)
            query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
            key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
            value = value.unflatten(-1, (-1, attn.head_dim))
            if attn.added_kv_proj_dim is not None:
                encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
                encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
                encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
                query = torch.cat([encoder_query, query], dim=1)
                key = torch.cat([encoder_key, key], dim=1)
                value = torch.cat([encoder_value, value], dim=1)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            hidden_states = attention_fn(query, key, value).flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is None:
                return hidden_states
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())

    return Float8AttnProcessor()
