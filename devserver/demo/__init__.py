"""The bundled example for `python -m devserver --demo`: a customer-support bot and its fixtures.

Customers write in (`support/message.received`, carrying the sessions `conversation_id` and
`user_id`). `triage` classifies each message with steps, hands refund requests to
`process_refund` with `send_event`, "thinks" for a few seconds (a durable sleep, so the dashboard
shows the run Running, then Completed) and sends the drafted reply on to `deliver_reply`. Events
sent by a run inherit its sessions, so every run of a conversation shows up under it.

One path fails on purpose: the payment provider declines the refund of order `ORD-4711`, every
attempt, so that run fails after its retries and `escalate_to_human` (its `on_failure` handler)
runs. The fixtures in `fixtures/` are a few multi-turn conversations, one of them on that path.

Run it with `python -m devserver --demo`, or replay the fixtures against it in CI style:
`python -m devserver replay fixtures/*.json* --app devserver.demo:app`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from devserver.app import App, NonRetriableError
from devserver.context import Context

app = App("support-bot")

FIXTURES = ("support_conversations.jsonl", "support_followup.json")
"""The fixture files `--demo` preloads, in order."""
THINK = "3s"
"""How long `triage` thinks before drafting a reply."""
DECLINED_ORDER = "ORD-4711"
"""The order whose refund the payment provider always declines."""

_ORDER = re.compile(r"\bORD-\d+\b")
_INTENTS = (
    ("refund", ("refund", "money back", "reembolso")),
    ("login", ("log in", "login", "password", "sign in")),
    ("shipping", ("deliver", "shipping", "envío", "address", "arrive", "tracking")),
    ("thanks", ("thanks", "thank you", "gracias", "all good")),
)
_REPLIES = {
    "refund": "I've asked our payments team to refund {orders}. You'll get an email once it "
              "goes through.",
    "login": "Sorry about that! Try the 'Forgot password' link; the email can take a few "
             "minutes and sometimes lands in spam.",
    "shipping": "Let me check on {orders} with the warehouse and get back to you.",
    "thanks": "Glad we could help. Have a great day!",
    "other": "Thanks for reaching out, a member of the team will reply shortly.",
}


def fixtures_dir() -> Path:
    """The example fixtures: inside the installed package, else the checkout's `fixtures/`."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "fixtures", package.parent / "fixtures"):
        if (candidate / FIXTURES[0]).is_file():
            return candidate
    return package.parent / "fixtures"


def fixture_paths() -> list[Path]:
    """The fixture files the demo preloads."""
    folder = fixtures_dir()
    return [folder / name for name in FIXTURES]


# -- step bodies: plain functions, easy to unit-test ----------------------------------------------


def load_message(data: dict[str, Any]) -> dict[str, Any]:
    """The message as the bot works with it."""
    return {"text": str(data.get("text", "")).strip(), "channel": data.get("channel", "chat"),
            "author": data.get("author", "customer")}


def classify(text: str) -> dict[str, Any]:
    """The message's intent and the order numbers it mentions."""
    lowered = text.lower()
    intent = next((name for name, words in _INTENTS if any(w in lowered for w in words)),
                  "other")
    return {"intent": intent, "orders": _ORDER.findall(text)}


def draft_reply(intent: dict[str, Any]) -> str:
    """A canned reply for the intent."""
    orders = ", ".join(intent["orders"]) or "your order"
    return _REPLIES[intent["intent"]].format(orders=orders)


def look_up_order(order_id: str) -> dict[str, Any]:
    """The order, from a pretend shop database."""
    cents = sum(map(ord, order_id)) * 7 % 9000 + 1000
    return {"order_id": order_id, "amount_cents": cents, "currency": "EUR"}


def refund_payment(order: dict[str, Any]) -> dict[str, Any]:
    """Ask the pretend payment provider for the refund; it declines one order every time."""
    if order["order_id"] == DECLINED_ORDER:
        raise RuntimeError(f"payment provider declined the refund of {order['order_id']}: "
                           "card expired")
    return {"refund_id": "re_" + order["order_id"].lower().replace("-", ""),
            "amount_cents": order["amount_cents"]}


# -- functions ----------------------------------------------------------------------------------


@app.function(trigger="support/message.received", retries=2)
async def triage(ctx: Context) -> dict[str, Any]:
    """Classify a customer's message, hand refunds off, think, then send a reply."""
    step = ctx.step
    message = await step.run("load-message", load_message, ctx.event.data)
    intent = await step.run("classify", classify, message["text"])
    if intent["intent"] == "refund" and intent["orders"]:
        await step.send_event("request-refund", [
            {"name": "support/refund.requested", "data": {"order_id": order}}
            for order in intent["orders"]
        ])
    await step.sleep("think", THINK)
    reply = await step.run("draft-reply", draft_reply, intent)
    await step.send_event("send-reply", {
        "name": "support/reply.ready",
        "data": {"reply": reply, "channel": message["channel"]},
    })
    return {"intent": intent["intent"], "reply": reply}


@app.function(trigger="support/reply.ready", retries=2)
async def deliver_reply(ctx: Context) -> dict[str, Any]:
    """Deliver a drafted reply on the conversation's channel."""
    channel = ctx.event.data.get("channel", "chat")
    sent = await ctx.step.run("deliver", lambda: {"channel": channel, "delivered": True})
    return dict(sent)


async def escalate_to_human(ctx: Context) -> dict[str, Any]:
    """A refund failed for good: open a ticket for a person to look at."""
    original = ctx.event.data.get("event") or {}
    order_id = (original.get("data") or {}).get("order_id", "?")
    ticket = await ctx.step.run("open-ticket", lambda: {"ticket": f"TCK-{order_id}",
                                                        "queue": "payments"})
    return dict(ticket)


@app.function(trigger="support/refund.requested", retries=2, on_failure=escalate_to_human)
async def process_refund(ctx: Context) -> dict[str, Any]:
    """Refund an order; fails (after its retries) for the order the provider declines."""
    order_id = ctx.event.data.get("order_id")
    if not isinstance(order_id, str):
        raise NonRetriableError("support/refund.requested needs data.order_id")
    order = await ctx.step.run("look-up-order", look_up_order, order_id)
    refund = await ctx.step.run("refund-payment", refund_payment, order)
    return dict(refund)


@app.function(trigger="support/conversation.closed", retries=2)
async def collect_feedback(ctx: Context) -> dict[str, Any]:
    """Record the customer's rating when a conversation closes."""
    rating = ctx.event.data.get("rating")
    saved = await ctx.step.run("record-rating", lambda: {"rating": rating,
                                                         "happy": (rating or 0) >= 4})
    return dict(saved)
