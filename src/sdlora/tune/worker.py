"""A trial in its own process: `python -m sdlora.tune.worker JOB.json` (the local executor's --parallel).

JOB.json holds {"job": TrialJob fields, "max_points": N or null}; the record goes to the tune folder's
`.trials/<name>.json` as in any executor. The exit status is 0 also for a failed trial (its record
says so); 128 + the signal after Ctrl-C / SIGTERM (the trial saved and is recorded `interrupted`); any
other non-zero status means the worker itself died.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from sdlora.tune.trial import run_trial, stop_on_signals

    spec = json.loads(open(argv[0], encoding="utf-8").read())
    try:
        with stop_on_signals():
            run_trial(spec["job"], max_points=spec.get("max_points"))
    except KeyboardInterrupt as exc:
        return 128 + getattr(exc, "signum", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
