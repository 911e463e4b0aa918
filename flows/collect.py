"""``python -m flows.collect``: run the collector once from the shell and exit.

It finishes every run started with ``wait=False`` (``--no-wait``) whose batches have
ended, like the scheduled ``kluster-collect-batches`` deployment does, and exits 0 when
nothing is left pending, 3 when some runs still wait for their batches, 1 on an error.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from prefect_kluster.flows.collect import main

    sys.exit(main())

STILL_PENDING = 3


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(
        prog="python -m flows.collect", description=(__doc__ or "").split("\n\n")[1]
    ).parse_args(argv)
    from prefect_kluster.cli import describe_error
    from prefect_kluster.flows.pending import collect_batches

    try:
        outcomes = collect_batches()
    except Exception as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    for name, outcome in sorted(outcomes.items()):
        print(f"{name}: {outcome}")
    left = [o for o in outcomes.values() if o in ("running", "pending")]
    print(f"{len(outcomes)} pending run(s) checked; {len(left)} still waiting for batches")
    return STILL_PENDING if left else 0
