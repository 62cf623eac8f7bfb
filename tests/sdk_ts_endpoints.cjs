// Durable endpoints (TypeScript SDK v4's `inngest.endpoint`) that go asynchronous, for
// tests/test_sdk_endpoints.py. Each path is an endpoint; the devserver continues them by
// requesting them again. Besides them it serves:
//   GET /calls          how many times each endpoint's handler ran, by path
//   GET /via-client?path=/x   calls /x with the SDK's own client (`fetchWithStream`, which
//                        reads the SSE stream and follows its redirect) and answers
//                        {status, body, chunks}
"use strict";

const http = require("node:http");
const { Inngest, NonRetriableError, step } = require("inngest");
const { endpointAdapter, serveEndpoint } = require("inngest/node");
const { stream } = require("inngest/experimental/durable-endpoints");
const { fetchWithStream } = require("inngest/experimental/durable-endpoints/client");

const port = Number(process.env.PORT);
const inngest = new Inngest({
  id: "shop-endpoints", isDev: true, baseUrl: process.env.DEVSERVER_URL, endpointAdapter,
});
const calls = {};
const attempts = {};

const json = (value, status = 200) => new Response(JSON.stringify(value), {
  status, headers: { "content-type": "application/json" },
});

const endpoints = {
  // A step, a sleep (the switch to async), a step: the server wakes it and calls again.
  "/sleepy": async (req) => {
    const url = new URL(req.url);
    const a = await step.run("before", () => `a:${url.searchParams.get("q")}`);
    await step.sleep("nap", "30m");
    const b = await step.run("after", () => "b");
    return json({ a, b, method: req.method }, 201);
  },
  // Ends within the request (no switch to async).
  "/quick": async () => json({ quick: await step.run("one", () => 1) }),
  // A POST with a JSON body (which the SDK reads itself: a handler can't read it, in
  // 4.24), then a sleep: the continuation is the same request again.
  "/echo": async (req) => {
    const q = await step.run("got", () => new URL(req.url).searchParams.get("q"));
    await step.sleep("nap", "1s");
    return json({ q, method: req.method, again: new URL(req.url).searchParams.get("q") });
  },
  // A step that fails on its first attempt and succeeds on its second.
  "/flaky": async () => {
    const value = await step.run("flaky", () => {
      attempts.flaky = (attempts.flaky || 0) + 1;
      if (attempts.flaky === 1) throw new Error("not yet");
      return attempts.flaky;
    });
    return json({ value });
  },
  // A step that fails every time: the run fails once its retries are spent.
  "/doomed": async () => {
    await step.run("doomed", () => {
      attempts.doomed = (attempts.doomed || 0) + 1;
      throw new Error(`doomed attempt ${attempts.doomed}`);
    });
    return json({ unreachable: true });
  },
  // A NonRetriableError after the switch to async: the run fails at once.
  "/fatal": async () => {
    await step.run("ok", () => "ok");
    await step.sleep("nap", "1s");
    await step.run("fatal", () => { throw new NonRetriableError("fatal after async"); });
    return json({ unreachable: true });
  },
  // Waits for an approval event that names the order.
  "/approval": async (req) => {
    const order = new URL(req.url).searchParams.get("order");
    const approved = await step.waitForEvent("approved", {
      event: "shop/approved", timeout: "1h", if: `async.data.order == "${order}"`,
    });
    return json({ order, by: approved ? approved.data.by : null });
  },
  // The first request hangs after its first step (as if the app stalled): the server
  // continues the run once it has heard nothing for a while.
  "/hang": async () => {
    const a = await step.run("a", () => "a");
    if (calls["/hang"] === 1) await new Promise(() => {});
    return json({ a, resumed: true });
  },
  // The first request fails outside any step; the server's call is its next attempt.
  "/throws-once": async () => {
    if (calls["/throws-once"] === 1) throw new Error("the first request fails");
    return json({ second: true });
  },
  // Parallel steps: the SDK hands them to the server, which calls each planned step.
  "/parallel": async () => {
    const [x, y] = await Promise.all([
      step.run("x", () => "x"), step.run("y", () => "y"),
    ]);
    return json({ x, y });
  },
  // Streams, then fails its step once: the retry's chunk replaces the rolled-back one.
  "/stream-retry": async () => {
    const n = await step.run("shaky", () => {
      attempts.shaky = (attempts.shaky || 0) + 1;
      stream.push(`partial ${attempts.shaky}`);
      if (attempts.shaky === 1) throw new Error("boom");
      return attempts.shaky;
    });
    return json({ n });
  },
  // Streams a chunk in each half, around a sleep.
  "/streamy": async () => {
    await step.run("first", () => { stream.push("chunk a"); return 1; });
    await step.sleep("nap", "1s");
    await step.run("second", () => { stream.push("chunk b"); return 2; });
    return json("streamed");
  },
};

const handlers = {};
for (const [path, fn] of Object.entries(endpoints)) {
  handlers[path] = serveEndpoint(inngest.endpoint(async (req) => {
    calls[path] = (calls[path] || 0) + 1;
    return fn(req);
  }));
}

async function viaClient(path) {
  const chunks = [];
  const resp = await fetchWithStream(`http://127.0.0.1:${port}${path}`, {
    onData: ({ data }) => { chunks.push(data); },
  });
  return { status: resp.status, body: await resp.text(), chunks };
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://127.0.0.1:${port}`);
  const handler = handlers[url.pathname];
  if (handler) return handler(req, res);
  try {
    if (url.pathname === "/calls") {
      res.writeHead(200, { "content-type": "application/json" });
      return res.end(JSON.stringify(calls));
    }
    if (url.pathname === "/via-client") {
      const out = await viaClient(url.searchParams.get("path"));
      res.writeHead(200, { "content-type": "application/json" });
      return res.end(JSON.stringify(out));
    }
    res.writeHead(404);
    res.end("not found");
  } catch (err) {
    res.writeHead(500, { "content-type": "text/plain" });
    res.end(String(err && err.stack || err));
  }
});
server.listen(port, "127.0.0.1", () => console.log(`listening on ${port}`));
