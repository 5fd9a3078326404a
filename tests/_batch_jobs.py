"""Jobs run on a `Batcher` from a test, outside any server: queued before the worker
starts, so every job that can share a batch does."""

from __future__ import annotations

import asyncio

from ldmkit.server.batcher import Batcher, Job


def run_jobs(pipe, specs, max_batch=32, cancel=(), edits=None):
    """Queue one job per SamplingArgs in `specs` (with `edits`, each its own EditInputs
    or None) on a batcher whose worker starts only once all are queued; returns each
    job's final event (None if cancelled) and the batcher."""
    loop = asyncio.new_event_loop()
    batcher = Batcher(pipe, max_batch=max_batch)
    jobs = [Job(args, loop, edit=edit)
            for args, edit in zip(specs, edits or [None] * len(specs))]
    for job in jobs:
        batcher.submit(job)
    for i in cancel:
        jobs[i].cancel()
    batcher.start()

    async def final(job):
        while True:
            kind, payload = await job.events.get()
            if kind in ("done", "error"):
                return kind, payload

    async def finals(live):
        return await asyncio.wait_for(asyncio.gather(*(final(j) for j in live)), 120)

    try:
        live = [job for i, job in enumerate(jobs) if i not in cancel]
        results = loop.run_until_complete(finals(live))
    finally:
        batcher.stop()
        loop.close()
    by_job = dict(zip(live, results))
    return [by_job.get(job) for job in jobs], batcher
