"""The benchmark's traffic: events shaped like real use, and the load generators that send them.

Every event carries a new message id and one of 1,000 conversations and 97 users as its
sessions (`conversation_id`, `user_id`), so the store sees the session upserts and index rows
of real traffic, not one hot pair. A request carries `per_request` such events. The same
workload drives both sides of a ratio: wrk (with a Lua script that builds each request's body)
when installed, else a built-in aiohttp client.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

CONVERSATIONS = 1000
USERS = 97
EVENT_NAME = "bench/e2e"


def event(n: int, *, thread: int = 0, name: str = EVENT_NAME) -> dict[str, Any]:
    """The `n`th event a load thread sends: a fresh message id, a spread of sessions."""
    k = thread * 100_000_000 + n
    return {"name": name,
            "data": {"message": "hello", "message_id": f"m{thread}_{n}"},
            "sessions": {"conversation_id": f"conv_{k * 7919 % CONVERSATIONS}",
                         "user_id": f"user_{k * 104729 % USERS}"}}


@dataclass(frozen=True)
class Workload:
    """`per_request` varied events a request, POSTed as a JSON array."""

    per_request: int = 1
    name: str = EVENT_NAME
    """The events' name (the flow-control rows send to their own functions)."""

    def body(self, start: int, *, thread: int = 0) -> bytes:
        """The body of a request whose first event is the `start`th of its thread."""
        return json.dumps([event(start + i, thread=thread, name=self.name)
                           for i in range(self.per_request)]).encode()

    def lua(self) -> str:
        """A wrk script that builds the same bodies as `body`, request after request."""
        return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = {{}}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
local n = 0
request = function()
  local parts = {{}}
  for j = 1, {self.per_request} do
    local k = tid * 100000000 + n
    parts[j] = string.format(
      '{{"name":"{self.name}","data":{{"message":"hello","message_id":"m%d_%d"}},' ..
      '"sessions":{{"conversation_id":"conv_%d","user_id":"user_%d"}}}}',
      tid, n, (k * 7919) % {CONVERSATIONS}, (k * 104729) % {USERS})
    n = n + 1
  end
  return wrk.format(nil, nil, nil, "[" .. table.concat(parts, ",") .. "]")
end
done = function(summary, latency, requests)
  io.write(string.format("non2xx=%d\\n", summary.errors.status))
end
"""


SINGLE = Workload(1)
"""One varied event a request: the ingest and end-to-end rows' traffic."""


def load(url: str, workload: Workload, seconds: float, connections: int = 32) -> float:
    """Events per second POSTed to `url` for `seconds` (all requests answered 200)."""
    if shutil.which("wrk"):
        return _wrk(url, workload, seconds, connections) * workload.per_request
    return asyncio.run(_aiohttp_load(url, workload, seconds, connections)) * workload.per_request


def _wrk(url: str, workload: Workload, seconds: float, connections: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(workload.lua())
    try:
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout",
             "30s", "-s", script.name, url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    bad = int(re.search(r"non2xx=(\d+)", out).group(1))  # type: ignore[union-attr]
    if bad or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors or {bad} non-2xx answers:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


async def _aiohttp_load(url: str, workload: Workload, seconds: float,
                        connections: int) -> float:
    """Requests per second with aiohttp clients, one counter per connection."""
    import aiohttp

    done = 0
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession, thread: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            body = workload.body(n, thread=thread)
            n += workload.per_request
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"load: HTTP {resp.status}")
            done += 1

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(connections)))
    return done / (time.perf_counter() - start)
