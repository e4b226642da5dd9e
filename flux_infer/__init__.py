"""flux-infer: the FLUX.1-dev Space, served locally from a diffusers FluxPipeline.

Layers, each in its own module:
- `settings`: every default and limit;
- `loading`: weights sources, device and dtype, `load_pipeline()`;
- `tiny`: the random FLUX.1-dev-shaped pipeline for tests and smoke runs;
- `inference`: request validation and the one generation path, `FluxInference.run()`;
- `previews`: the latent and TAEF1 preview decoders;
- `web` and `cli`: front ends that only translate their inputs into a request for `run()`.
Importing the package loads nothing: no torch, no weights, no network.
"""

__version__ = "0.1.0"
