"""Render examples/photos/: 12 synthetic "phone photos" of one toy, saved as HEIC.

The drawing code lives in the package (`sdlora.example_photos`) so `sdlora demo` can render the
same photos on a machine that installed sdlora from PyPI. Run from the repository root:

    python examples/make_photos.py            # writes examples/photos/toy_01.heic ...
"""

import sys
from pathlib import Path

from sdlora.example_photos import write_example_photos

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "photos"
    for path in write_example_photos(out):
        print(path, path.stat().st_size)
