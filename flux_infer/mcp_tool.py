"""`--mcp`: the Space's `infer` as an MCP tool, served with the `mcp` SDK at `/gradio_api/mcp/`.

The tool takes the Space's arguments, goes through the same validation (`build_request`), the same
line and the same `Service.stream()` as `/infer`, reports each denoising step as MCP progress (when
the client asks for it with a progress token), and returns the image as MCP image content (PNG,
base64) followed by a short text with the seed and settings. Bad values, a full line and failed
generations are tool errors whose text says what to change.
"""

# No `from __future__ import annotations`: FastMCP reads the tool's annotations, and `Context` is
# imported inside build_mcp(), where only evaluated annotations can see it.

import base64
import logging

from flux_infer import settings
from flux_infer.images import encode
from flux_infer.inference import GenerationFailed, InvalidRequest
from flux_infer.previews import Step
from flux_infer.service import Busy, new_request_id, unexpected_failure

MOUNT_PATH = "/gradio_api/mcp"
DESCRIPTION = (
    "Generate an image with FLUX.1 [dev] from a text prompt. Returns the image (PNG) and a line with "
    "the seed and settings it was made with; the same seed and settings give the same image. "
    "width and height: 256 to 2048, rounded down to a multiple of 16. guidance_scale: 1 to 15 (3.5 is "
    "usual). num_inference_steps: 1 to 50 (28 is usual; fewer is faster). seed: 0 to 2147483647, "
    "used when randomize_seed is false."
)


def build_mcp(service, *, host: str):
    """A FastMCP server with the `infer` tool; mount its `streamable_http_app()` at MOUNT_PATH and run
    its `session_manager` in the app's lifespan. `host`: the server's bind address (MCP's DNS
    rebinding protection applies on loopback)."""
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.exceptions import ToolError
    from mcp.types import ImageContent, TextContent
    from starlette.concurrency import run_in_threadpool

    server = FastMCP("flux-infer", host=host, streamable_http_path="/", stateless_http=True)
    logging.getLogger("mcp").setLevel(logging.WARNING)  # not a line per MCP message in the server's log

    @server.tool(name="infer", description=DESCRIPTION)
    async def infer(prompt: str, ctx: Context, seed: int = 0, randomize_seed: bool = True,
                    width: int = int(settings.WIDTH.default), height: int = int(settings.HEIGHT.default),
                    guidance_scale: float = settings.GUIDANCE_SCALE.default,
                    num_inference_steps: int = int(settings.NUM_INFERENCE_STEPS.default)) -> list:
        try:
            request, ticket = service.admit_request(
                "mcp", prompt=prompt, seed=seed, randomize_seed=randomize_seed, width=width, height=height,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
        except (InvalidRequest, Busy) as err:  # counted by admit_request()
            raise ToolError(str(err)) from None
        result = None
        steps = service.stream(ticket, request, request_id=new_request_id())
        try:
            async for item in steps:
                if isinstance(item, Step):
                    await ctx.report_progress(item.index, item.total, f"denoising step {item.index} of {item.total}")
                else:
                    result = item
        except (InvalidRequest, GenerationFailed) as err:  # a LoRA that cannot load, the GPU's memory
            raise ToolError(str(err)) from None
        except Exception as err:  # the log has the traceback, the caller one line
            raise ToolError(unexpected_failure("mcp", err)) from None
        finally:
            await steps.aclose()
        png = await run_in_threadpool(encode, result.image, "png")
        made = result.request
        return [
            ImageContent(type="image", data=base64.b64encode(png).decode("ascii"), mimeType="image/png"),
            TextContent(type="text", text=f"seed {result.seed}, {made.width}x{made.height}, "
                                          f"{made.num_inference_steps} steps, guidance {made.guidance_scale:g}"),
        ]

    return server
