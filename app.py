"""Run the server as the Space does: `python app.py [flags]` is `flux-infer serve [flags]`."""

import sys

from flux_infer.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
