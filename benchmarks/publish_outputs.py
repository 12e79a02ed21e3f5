"""Host time of one engine step's publishing: ``AutoGLMEngine`` hands each changed request's output to its
``RequestHandle``, whose asyncio consumers (the serving benchmark's client, the HTTP server's streams) wait
on one event loop. Woken one ``call_soon_threadsafe`` per handle, a 512-request step made 512 cross-thread
calls (a self-pipe write each); batched, one per loop (``async_engine.wake_loops``). This times both ways:
``--handles`` consumers awaiting on one loop in a client thread, ``--steps`` publishes each, median ms.

    PYTHONPATH=. .venv/bin/python benchmarks/publish_outputs.py --handles=512
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

from absl import app, flags

from autoglm_jax.engine.async_engine import RequestHandle, wake_loops

flags.DEFINE_integer("handles", 512, "Requests published each step (one asyncio consumer each).")
flags.DEFINE_integer("steps", 50, "Steps timed per mode.")
FLAGS = flags.FLAGS


class _Output:
    def __init__(self, finished: bool):
        self.finished = finished


def publish_ms(batched: bool) -> float:
    """Median ms to publish one output to every handle (all consumers awaiting) over FLAGS.steps steps."""
    handles = [RequestHandle(f"r{i}") for i in range(FLAGS.handles)]
    ready = threading.Event()

    async def consume(handle):
        async for _ in handle:
            pass

    async def main():
        tasks = [asyncio.create_task(consume(h)) for h in handles]
        ready.set()
        await asyncio.gather(*tasks)

    client = threading.Thread(target=asyncio.run, args=(main(),))
    client.start()
    ready.wait()
    times = []
    for step in range(FLAGS.steps + 1):
        while not all(h._async_waiters for h in handles):  # every consumer awaits its next output
            time.sleep(0.001)
        finished = step == FLAGS.steps
        start = time.perf_counter()
        wakeups = {} if batched else None
        for handle in handles:
            handle._publish(_Output(finished), wakeups=wakeups)
        if batched:
            wake_loops(wakeups)
        if not finished:
            times.append(time.perf_counter() - start)
    client.join()
    return 1e3 * statistics.median(times)


def main(argv):
    del argv
    for batched in (False, True, False, True):
        print(f"{FLAGS.handles} handles, {'one wake-up per loop' if batched else 'one wake-up per handle'}: "
              f"{publish_ms(batched):.2f} ms per step (median of {FLAGS.steps})", flush=True)


if __name__ == "__main__":
    app.run(main)
