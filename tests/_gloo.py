"""Running gloo worker processes for the vocabulary-parallel tests: one copy of the bookkeeping."""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback


def record(work, path) -> None:
    """Run every ``(name, fn)`` of ``work`` (inside a worker) and write ``{name: {ok, loss | error}}`` to ``path``."""
    results = {}
    for name, run in work:
        try:
            results[name] = {"ok": True, "loss": run()}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
    with open(path, "w") as fh:
        json.dump(results, fh)


def spawn(target, arg_lists, what: str, timeout: float = 180.0) -> None:
    """Start ``target(*args)`` in one spawned process per ``args`` and wait; a hang or a non-zero exit fails."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join()
    assert not hung, f"{what} workers hung (a collective mismatch?)"
    assert [p.exitcode for p in procs] == [0] * len(procs), [p.exitcode for p in procs]


def load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)
