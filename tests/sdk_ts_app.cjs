// A TypeScript-SDK (inngest@4) app for tests/test_sdk_ts.py, served by Node's http server.
//
// Environment: DEVSERVER_URL (the devserver to register with and send to), PORT (to listen
// on, 127.0.0.1), APP_VERSION ("1" or "2": version 2 drops `strict` and adds `added`, to test
// re-syncing an app that restarted with new code). Besides the Inngest endpoint at
// /api/inngest it serves POST /send, which sends the JSON body with `inngest.send()`, and
// POST /metadata, which attaches {values, kind} to run {runId} (step {stepId}) with the SDK.
"use strict";

const http = require("node:http");
const { Inngest, NonRetriableError, RetryAfterError } = require("inngest");
const { serve } = require("inngest/node");
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

const callData = inngest.createFunction(
  { id: "call-data", triggers: [{ event: "shop/call-data" }] },
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
    try {
      await step.invoke("late", { function: slowChild, data: {}, timeout: "1s" });
    } catch (err) {
      return { seen, timeout: [err.name, err.message] };
    }
    return { seen, timeout: null };
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
];
if (version === "1") functions.push(strict);
else functions.push(added);
const handler = serve({ client: inngest, functions });

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
  return handler(req, res);
});
server.listen(Number(process.env.PORT), "127.0.0.1", () => {
  console.log(`listening on ${server.address().port}, version ${version}`);
});
