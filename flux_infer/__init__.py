"""flux-infer: the FLUX.1-dev Space, served locally from a diffusers FluxPipeline.

Layers, each in its own module:
- `settings`: every default and limit;
- `loading`: weights sources, device and dtype, `load_pipeline()`; `tuning`: memory and speed
  options; `tiny` and `random_weights`: random pipelines (tiny, and FLUX.1-dev's real architecture);
- `inference`: request validation and the one generation path, a `Backend`'s `run()`
  (`FluxInference` here, `cluster.RemoteInference` on Ray Serve); `previews`: preview decoders;
- `scheduler` and `service`: the one line every door waits in, and what the doors share;
- `web`, `openai_api`, `server` and `cli`: front ends that only translate their inputs into a request.
Importing the package loads nothing: no torch, no weights, no network.
"""

__version__ = "0.1.0"
