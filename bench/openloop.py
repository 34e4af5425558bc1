"""Open-loop load at a fixed offered rate: `python -m bench.openloop --port P --rate 500 --duration 10`.

wrk is closed-loop (a slow answer delays the next request) and wrk2 is not packaged in Debian. h2load
(nghttp2-client) has `--rps`, but its per-request times are quantized to about 1 ms and showed 5 ms
medians where wrk measured 0.3 ms on the same proxy, so this small generator is used instead.

Requests are sent on a fixed schedule (rate per second, evenly spaced) whatever the answers do. A request
takes an idle keep-alive connection or opens a new one, so a slow system does not slow the senders;
only past `--max-connections` does a request wait for a connection, and that wait then counts in its
latency ("from schedule"). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.http1 import build_request, read_response
from bench.stats import percentiles_ms

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Tally:
    service_s: list[float] = field(default_factory=list)  # response complete - request written
    from_schedule_s: list[float] = field(default_factory=list)  # response complete - scheduled send time
    send_lag_s: list[float] = field(default_factory=list)  # request written - scheduled send time
    ok: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    last_done: float = 0.0


class ConnectionPool:
    """Idle keep-alive connections; grows on demand up to a cap, then requests queue for a connection."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self.idle: asyncio.Queue[Connection] = asyncio.Queue()
        self.opened = 0
        self.peak_open = 0

    async def acquire(self) -> Connection:
        if self.idle.empty() and self.opened < self.max_connections:
            self.opened += 1
            self.peak_open = max(self.peak_open, self.opened)
            try:
                return await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.opened -= 1
                raise
        return await self.idle.get()

    def release(self, connection: Connection, reusable: bool) -> None:
        if reusable:
            self.idle.put_nowait(connection)
        else:
            connection[1].close()
            self.opened -= 1

    def close_all(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()[1].close()


async def one_request(pool: ConnectionPool, request: bytes, scheduled: float, timeout: float, tally: Tally) -> None:
    connection: Connection | None = None
    reusable = False
    try:
        async with asyncio.timeout(timeout):
            connection = await pool.acquire()
            reader, writer = connection
            sent = time.perf_counter()
            writer.write(request)
            response = await read_response(reader)
        done = time.perf_counter()
        reusable = response.keep_alive
        tally.service_s.append(done - sent)
        tally.from_schedule_s.append(done - scheduled)
        tally.send_lag_s.append(sent - scheduled)
        tally.last_done = max(tally.last_done, done)
        if 200 <= response.status < 300:
            tally.ok += 1
        else:
            tally.non_2xx += 1
    except TimeoutError:
        tally.timeouts += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        tally.socket_errors += 1
    finally:
        if connection is not None:
            pool.release(connection, reusable)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = Path(args.body_file).read_bytes()
    request = build_request(args.host, args.port, args.path, body)
    pool = ConnectionPool(args.host, args.port, args.max_connections)
    tally = Tally()
    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    start = time.perf_counter() + 0.05
    tasks: set[asyncio.Task[None]] = set()
    for index in range(total):
        scheduled = start + index * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one_request(pool, request, scheduled, args.timeout, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=args.timeout + 1)
    pool.close_all()
    return summarize(args, tally, total, start, pool.peak_open)


def summarize(args: argparse.Namespace, tally: Tally, sent: int, start: float, peak_open: int) -> dict[str, Any]:
    completed = tally.ok + tally.non_2xx
    elapsed = (tally.last_done - start) if tally.last_done else args.duration
    return {
        "tool": "bench.openloop",
        "offered_rps": args.rate,
        "duration_s": args.duration,
        "scheduled": sent,
        "completed": completed,
        "ok": tally.ok,
        # Completions over the time from the first scheduled send to the last answer: below the offered rate
        # means the system fell behind (its queue grew during the run).
        "achieved_rps": completed / elapsed if elapsed > 0 else 0.0,
        "errors": {
            "non_2xx": tally.non_2xx,
            "socket": tally.socket_errors,
            "timeout": tally.timeouts,
            "unfinished": sent - completed - tally.socket_errors - tally.timeouts,
        },
        "latency_ms": percentiles_ms(tally.service_s),
        "latency_from_schedule_ms": percentiles_ms(tally.from_schedule_s),
        "send_lag_ms": percentiles_ms(tally.send_lag_s),
        "peak_connections": peak_open,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, evenly spaced")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request, connection wait included")
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
