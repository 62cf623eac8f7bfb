// A TypeScript-SDK (inngest@4) app for tests/test_sdk_ts.py, served by Node's http server.
//
// Environment: DEVSERVER_URL (the devserver to register with and send to), PORT (to listen
// on, 127.0.0.1), APP_VERSION ("1" or "2": version 2 drops `strict` and adds `added`, to test
// re-syncing an app that restarted with new code). Besides the Inngest endpoint at
// /api/inngest it serves POST /send, which sends the JSON body with `inngest.send()`, and
// POST /metadata, which attaches {values, kind} to run {runId} (step {stepId}) with the SDK,
// GET /calls, what each call to /api/inngest carried (its `stepId`, `ctx` flags and memo keys),
// POST /release (see "holder") and GET /endpoint (a durable endpoint).
// Bodies over 8 MiB are refused with 413, as a framework's default body limit would.
"use strict";

const http = require("node:http");
const { Readable } = require("node:stream");
const { Inngest, NonRetriableError, RetryAfterError, referenceFunction, step } = require("inngest");
const { endpointAdapter, serve, serveEndpoint } = require("inngest/node");
const { createDefer, metadataMiddleware } = require("inngest/experimental");

const version = process.env.APP_VERSION || "1";
const inngest = new Inngest({
  id: "shop", isDev: true, baseUrl: process.env.DEVSERVER_URL,
  middleware: [metadataMiddleware()],
});
let charges = 0;

const checkout = inngest.createFunction(
  { id: "checkout", retries: 2, triggers: [{ event: "shop/order.placed" }] },
  async ({ event, step }) => {
    const total = await step.run("price", () => event.data.items.reduce((a, b) => a + b, 0));
    const doubled = await step.run("price", () => total * 2); // a repeated step id
    await step.sleep("cool-off", "1h");
    const [tax, shipping] = await Promise.all([
      step.run("tax", () => total / 10),
      step.run("shipping", () => 5),
    ]);
    await step.sendEvent("receipt", { name: "shop/receipt.sent", data: { total } });
    return { total, doubled, tax, shipping };
  },
);

const receipt = inngest.createFunction(
  { id: "receipt", triggers: [{ event: "shop/receipt.sent" }] },
  async ({ event }) => ({ mailed: event.data.total }),
);

const charge = inngest.createFunction(
  { id: "charge", retries: 2, triggers: [{ event: "shop/charge" }] },
  async ({ step }) => step.run("charge-card", () => {
    charges += 1;
    if (charges < 3) throw new Error(`card declined (${charges})`);
    return "charged";
  }),
);

const ship = inngest.createFunction(
  {
    id: "ship", retries: 1, triggers: [{ event: "shop/ship" }],
    onFailure: async ({ error }) => ({ handled: error.message }),
  },
  async ({ step }) => {
    await step.run("call-carrier", () => { throw new Error("carrier API is down"); });
  },
);

const bundle = inngest.createFunction(
  { id: "bundle", retries: 1, triggers: [{ event: "shop/bundle" }] },
  async ({ step }) => Promise.all([
    step.run("pack", () => { throw new Error("no boxes left"); }),
    step.run("label", () => "labelled"),
  ]),
);

const strict = inngest.createFunction(
  { id: "strict", retries: 3, triggers: [{ event: "shop/strict" }] },
  async () => { throw new NonRetriableError("this order can never be processed"); },
);

const later = inngest.createFunction(
  { id: "later", retries: 2, triggers: [{ event: "shop/later" }] },
  async ({ attempt }) => {
    if (attempt === 0) throw new RetryAfterError("rate limited", "2h");
    return attempt;
  },
);

const refund = inngest.createFunction(
  { id: "refund", triggers: [{ event: "shop/refund" }] },
  async ({ event }) => event.data.amount * 100,
);

const refundRequest = inngest.createFunction(
  { id: "refund-request", triggers: [{ event: "shop/refund.requested", if: "event.data.amount > 0" }] },
  async ({ step }) => {
    const approval = await step.waitForEvent("approval", {
      event: "shop/refund.approved", timeout: "1h",
      if: "async.data.refund_id == event.data.refund_id",
    });
    if (approval === null) return { approved: false };
    const cents = await step.invoke("refund", { function: refund, data: { amount: approval.data.amount } });
    return { approved: true, cents };
  },
);

const cancellable = inngest.createFunction(
  {
    id: "cancellable", triggers: [{ event: "shop/hold" }],
    cancelOn: [{ event: "shop/hold.released", match: "data.order_id" }],
  },
  async ({ step }) => {
    await step.sleep("hold", "1d");
    return "held a day";
  },
);

// Barriers that open once `n` steps have reached them: a step that waits at one can only pass
// if its siblings run at the same time (one after another, the first times out and fails).
const barriers = new Map();
function barrier(name, n, timeoutMs = 20000) {
  let b = barriers.get(name);
  if (!b) {
    let open;
    b = { arrived: 0, opened: new Promise((resolve) => { open = resolve; }) };
    b.open = open;
    barriers.set(name, b);
  }
  b.arrived += 1;
  if (b.arrived >= n) b.open();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`barrier ${name}: ${b.arrived} of ${n} arrived`)),
      timeoutMs);
  });
  return Promise.race([b.opened, timeout]).finally(() => clearTimeout(timer));
}

// Checkpointing is on by default in inngest 4 (for a call carrying `ctx.fn_id`): fan-out
// checkpoints the steps it runs within a call, fan-out-plain answers 206 for each.
const fanOutHandler = async ({ event, step }) => {
    const key = event.data.key;
    const parts = await Promise.all(["a", "b", "c"].map((part) => step.run(`part-${part}`,
      async () => { await barrier(`${key}-parts`, 3); return { part, at: Date.now() }; })));
    const joined = await step.run("join", () => parts.map((p) => p.part).join(""));
    return { joined, parts };
};
const fanOut = inngest.createFunction(
  { id: "fan-out", retries: 0, triggers: [{ event: "shop/fan-out" }] }, fanOutHandler);
const fanOutPlain = inngest.createFunction(
  { id: "fan-out-plain", retries: 0, checkpointing: false,
    triggers: [{ event: "shop/fan-out-plain" }] }, fanOutHandler);

const racer = inngest.createFunction(
  { id: "racer", retries: 0, triggers: [{ event: "shop/race" }] },
  async ({ event, group, step }) => {
    const key = event.data.key;
    // "slow" can only finish once "after-race" has started: the function must go on as soon
    // as "fast" is done, while "slow" still runs.
    const winner = await group.parallel(async () => Promise.race([
      step.run("fast", () => "fast"),
      step.run("slow", async () => { await barrier(`${key}-after`, 2); return "slow"; }),
    ]));
    const after = await step.run("after-race", async () => {
      await barrier(`${key}-after`, 2);
      return `after ${winner}`;
    });
    return { winner, after };
  },
);

// A parallel group that ends when its sleep ends: the step after it is planned first.
const nappingGroup = inngest.createFunction(
  { id: "napping-group", retries: 0, triggers: [{ event: "shop/napping-group" }] },
  async ({ step }) => {
    const [work] = await Promise.all([step.run("work", () => "worked"), step.sleep("nap", "1h")]);
    return step.run("after-nap", () => `${work}, then napped`);
  },
);

// Three steps in a row: with checkpointing, all run within one call, each checkpointed.
const inARowHandler = async ({ step }) => {
  const a = await step.run("a", () => "a");
  const b = await step.run("b", () => `${a}b`);
  return step.run("c", () => `${b}c`);
};
const inARow = inngest.createFunction(
  { id: "in-a-row", retries: 0, triggers: [{ event: "shop/in-a-row" }] }, inARowHandler);
const inARowPlain = inngest.createFunction(
  { id: "in-a-row-plain", retries: 0, checkpointing: false,
    triggers: [{ event: "shop/in-a-row-plain" }] }, inARowHandler);

// "held" waits until POST /release: "first", checkpointed before, must never run again.
let firstRuns = 0;
let release;
const released = new Promise((resolve) => { release = resolve; });
const holder = inngest.createFunction(
  { id: "holder", retries: 0, triggers: [{ event: "shop/hold-checkpoint" }] },
  async ({ step }) => {
    const first = await step.run("first", () => { firstRuns += 1; return "first"; });
    const held = await step.run("held", async () => { await released; return "held"; });
    return { first, held, firstRuns };
  },
);

// A memo of over 10 MiB: three steps of 3.5 MiB each, to an app that refuses bodies over
// 8 MiB (see BODY_LIMIT): the calls must say use_api and the SDK fetch the memo instead.
// Not checkpointed: all its steps would run within the first call, with an empty memo.
const big = inngest.createFunction(
  { id: "big", retries: 0, checkpointing: false, triggers: [{ event: "shop/big" }] },
  async ({ step }) => {
    const chunks = [];
    for (const name of ["one", "two", "three"]) {
      chunks.push(await step.run(name, () => name[0].repeat(3.5 * 1024 * 1024)));
    }
    return step.run("sizes", () => chunks.map((c) => `${c[0]}:${c.length}`));
  },
);

// A durable endpoint: a plain GET /endpoint runs its steps in the request, and the SDK
// records the run on the devserver through /v1/checkpoint as it goes.
const endpoints = new Inngest({
  id: "shop-endpoints", isDev: true, baseUrl: process.env.DEVSERVER_URL, endpointAdapter,
});
const durable = serveEndpoint(endpoints.endpoint(async () => {
  const a = await step.run("look-up", () => 20);
  const b = await step.run("add", () => a + 1);
  return new Response(JSON.stringify({ answer: b * 2 }), {
    status: 200, headers: { "content-type": "application/json" },
  });
}));

class CodedError extends Error {
  constructor(message) {
    super(message);
    this.name = "CodedError";
    this.code = "E_CODED";
  }
}

const coded = inngest.createFunction(
  {
    id: "coded", retries: 0, triggers: [{ event: "shop/coded" }],
    onFailure: async ({ event }) => ({ failed: event.data }),
  },
  async () => { throw new CodedError("a coded failure"); },
);

const caused = inngest.createFunction(
  { id: "caused", retries: 0, triggers: [{ event: "shop/caused" }] },
  async ({ step }) => {
    try {
      await step.run("fragile", () => {
        throw new Error("outer failure", { cause: new CodedError("inner failure") });
      });
    } catch (err) {
      return { name: err.name, message: err.message, cause: err.cause && err.cause.message };
    }
    return "unreachable";
  },
);

const stepNoRetry = inngest.createFunction(
  { id: "step-no-retry", retries: 3, triggers: [{ event: "shop/step-no-retry" }] },
  async ({ step }) => {
    try {
      await step.run("never", () => { throw new NonRetriableError("this step never works"); });
    } catch (err) {
      return { name: err.name, message: err.message };
    }
    return "unreachable";
  },
);

// Not checkpointed: its step and its end must come in two calls, each with its own request id.
const callData = inngest.createFunction(
  { id: "call-data", checkpointing: false, triggers: [{ event: "shop/call-data" }] },
  async ({ step, requestId, jobId }) => {
    const first = await step.run("first", () => ({ requestId, jobId }));
    return { step: first, fn: { requestId, jobId } };
  },
);

const echo = inngest.createFunction(
  { id: "echo", triggers: [{ event: "shop/never" }] },
  async ({ event }) => event.data,
);

const slowChild = inngest.createFunction(
  { id: "slow-child", retries: 0, triggers: [{ event: "shop/never" }] },
  async ({ step }) => { await step.sleep("nap", "1m"); },
);

const invoker = inngest.createFunction(
  { id: "invoker", retries: 0, triggers: [{ event: "shop/invoker" }] },
  async ({ step }) => {
    const seen = await step.invoke("child", { function: echo, data: { total: 7 } });
    let missing = null; // a function no app registered: the invoke fails, as Inngest words it
    try {
      await step.invoke("nobody", { function: referenceFunction({ functionId: "nobody" }) });
    } catch (err) {
      missing = [err.name, err.message];
    }
    try {
      await step.invoke("late", { function: slowChild, data: {}, timeout: "1s" });
    } catch (err) {
      return { seen, missing, timeout: [err.name, err.message] };
    }
    return { seen, missing, timeout: null };
  },
);

const ask = inngest.createFunction(
  { id: "ask", retries: 1, triggers: [{ event: "shop/ask" }] },
  async ({ event, step }) => step.ai.infer("ask-model", {
    model: step.ai.models.openai({
      model: "gpt-test", apiKey: "sk-test", baseUrl: event.data.baseUrl,
    }),
    body: { messages: [{ role: "user", content: event.data.question }] },
  }),
);

const scorer = createDefer(inngest, { id: "scorer" }, async ({ event, parents }) => ({
  got: event.data, parents,
}));

const deferring = inngest.createFunction(
  { id: "deferring", triggers: [{ event: "shop/deferring" }] },
  async ({ step, defer }) => {
    defer("score-it", { function: scorer, data: { points: 3 } });
    const dropped = defer("drop-it", { function: scorer, data: { points: 0 } });
    const worked = await step.run("work", () => 7);
    dropped.abort();
    return worked;
  },
);

const measured = inngest.createFunction(
  { id: "measured", triggers: [{ event: "shop/measured" }] },
  async ({ step }) => {
    await step.metadata("note").set({ rows: 5 }, "stats");
    return "measured";
  },
);

const added = inngest.createFunction(
  { id: "added", triggers: [{ event: "shop/added" }] },
  async () => "new in version 2",
);

// Flow control: one run for a batch of up to 3 events (or what arrived within 10 minutes).
const batched = inngest.createFunction(
  { id: "batched", triggers: [{ event: "shop/viewed" }], batchEvents: { maxSize: 3, timeout: "10m" } },
  async ({ event, events, sessions, step }) => {
    const pages = await step.run("pages", () => events.map((e) => e.data.page));
    return { first: event.data.page, pages, sessions: sessions ?? null };
  },
);

const functions = [
  checkout, receipt, charge, ship, bundle, later, refund, refundRequest, cancellable, batched,
  coded, caused, stepNoRetry, callData, echo, slowChild, invoker, ask, scorer, deferring, measured,
  fanOut, fanOutPlain, racer, inARow, inARowPlain, holder, big, nappingGroup,
];
if (version === "1") functions.push(strict);
else functions.push(added);
const handler = serve({ client: inngest, functions });
const calls = [];
const BODY_LIMIT = 8 * 1024 * 1024;

const server = http.createServer(async (req, res) => {
  if (req.method === "POST" && req.url === "/metadata") {
    // Attach metadata to a run (or one of its steps) with the SDK's own API call.
    let body = "";
    for await (const chunk of req) body += chunk;
    try {
      const { runId, stepId, values, kind } = JSON.parse(body);
      let builder = inngest.metadata.run(runId);
      if (stepId) builder = builder.step(stepId);
      await builder.set(values, kind);
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
    } catch (err) {
      res.writeHead(500, { "content-type": "text/plain" });
      res.end(String((err && err.stack) || err));
    }
    return;
  }
  if (req.method === "POST" && req.url === "/send") {
    let body = "";
    for await (const chunk of req) body += chunk;
    try {
      const result = await inngest.send(JSON.parse(body));
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(result));
    } catch (err) {
      res.writeHead(500, { "content-type": "text/plain" });
      res.end(String((err && err.stack) || err));
    }
    return;
  }
  if (req.method === "POST" && req.url === "/release") {
    release();
    res.writeHead(200, { "content-type": "application/json" });
    res.end("{}");
    return;
  }
  if (req.url.startsWith("/endpoint")) return durable(req, res);
  if (req.method === "GET" && req.url === "/calls") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(calls));
    return;
  }
  if (req.method === "POST" && req.url.startsWith("/api/inngest")) {
    const chunks = [];
    let size = 0;
    for await (const chunk of req) {
      size += chunk.length;
      if (size > BODY_LIMIT) {
        res.writeHead(413, { "content-type": "text/plain" });
        res.end("request body over 8 MiB");
        return;
      }
      chunks.push(chunk);
    }
    const raw = Buffer.concat(chunks);
    try {
      const body = JSON.parse(raw.toString("utf8"));
      const query = new URL(req.url, "http://x").searchParams;
      calls.push({
        fnId: query.get("fnId"), stepId: query.get("stepId"), at: Date.now(),
        disable: body.ctx && body.ctx.disable_immediate_execution,
        useApi: body.use_api, ctxFnId: body.ctx && body.ctx.fn_id,
        steps: Object.keys(body.steps || {}),
      });
    } catch (err) { /* not JSON: the SDK will say so */ }
    const replay = Readable.from([raw]);
    Object.assign(replay, { headers: req.headers, method: req.method, url: req.url,
                            socket: req.socket });
    return handler(replay, res);
  }
  return handler(req, res);
});
server.listen(Number(process.env.PORT), "127.0.0.1", () => {
  console.log(`listening on ${server.address().port}, version ${version}`);
});
