"""`python -m ocula.server.api_server`, with `timeline_marks` installed when MARKS_DIR_ENV names
a folder: in this process at import, and in the engine process too, since multiprocessing's
spawn imports this module again there (as `__mp_main__`) before the engine starts."""

from __future__ import annotations

import os

from benchmarks.timeline_marks import MARKS_DIR_ENV, install

if os.environ.get(MARKS_DIR_ENV):
    install(os.environ[MARKS_DIR_ENV])

if __name__ == "__main__":
    from ocula.server.api_server import main

    main()
