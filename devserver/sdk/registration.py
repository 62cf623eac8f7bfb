"""An Inngest SDK app's registration (`POST /fn/register`), validated and turned into
`FunctionDef`s whose runs go to the SDK (`FunctionDef.remote`).

Pure logic. Both SDKs' spellings are accepted (Python sends `appname`, TypeScript `appName`);
each function config gives its id, name, triggers (events with CEL expressions, crons), retries
(`steps.step.retries.attempts`, default 4), where the SDK serves it (`steps.step.runtime.url`)
`cancel` conditions and flow control (`concurrency`, `throttle`, `rateLimit`, `debounce`,
`batchEvents`, `priority`, `singleton`, `idempotency`, `timeouts`: `devserver.model.flow`).
`onFailure` handlers arrive as an extra function `<id>-failure` triggered by
`inngest/function.failed`, so they need nothing special. Every option is emulated: none is
listed as ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from devserver.app import CancelTrigger, FunctionDef, Handler
from devserver.errors import UserError
from devserver.model.expressions import Expression
from devserver.model.flow import parse_sdk
from devserver.model.retry import DEFAULT_RETRIES
from devserver.model.triggers import CronTrigger, EventTrigger, parse_event_trigger
from devserver.sdk.protocol import ROOT_STEP, kind_of, text_of

MAX_SDK_RETRIES = 20
"""Inngest refuses functions configured with more retries than this."""
IGNORED_CONFIG: tuple[str, ...] = ()
"""Function options a registration may carry that this server accepts but does not emulate:
none (flow control is emulated, SPEC 3.3)."""


@dataclass(frozen=True)
class Registration:
    """An SDK app's `POST /fn/register`, validated."""

    app_id: str
    url: str
    sdk: str
    framework: str
    functions: list[FunctionDef]
    ignored: dict[str, list[str]]
    """Per function id, the options it sets that this server does not emulate."""
    checksum: str
    configs: list[dict[str, Any]]
    """The functions' configs as the SDK sent them (for `GET /dev`)."""


def parse_registration(body: Any) -> Registration:
    """Validate a registration and build its functions; `UserError` says what is wrong."""
    if not isinstance(body, dict):
        raise UserError(f"a registration must be a JSON object, got {kind_of(body)}")
    app_id = body.get("appname", body.get("appName"))
    if not isinstance(app_id, str) or not app_id.strip():
        raise UserError("registration: 'appname' (or 'appName') must be a non-empty string")
    url = body.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UserError("registration: 'url' must be the app's http(s) URL")
    configs = body.get("functions")
    if configs is None:
        configs = []
    if not isinstance(configs, list):
        raise UserError(f"registration: 'functions' must be an array, got {kind_of(configs)}")
    by_id: dict[str, FunctionDef] = {}  # a dict: checking ids stays linear for thousands
    ignored: dict[str, list[str]] = {}
    for index, config in enumerate(configs):
        fn, skipped = _function(app_id, config, f"functions[{index}]")
        if fn.id in by_id:
            raise UserError(f"functions[{index}]: two functions have the id {fn.id!r}")
        by_id[fn.id] = fn
        if skipped:
            ignored[fn.id] = skipped
    return Registration(
        app_id=app_id, url=url, sdk=text_of(body.get("sdk")),
        framework=text_of(body.get("framework")), functions=list(by_id.values()),
        ignored=ignored, checksum=checksum(body), configs=configs)


def identify(body: Any) -> tuple[str, str] | None:
    """A registration's (app id, checksum) when it names its app, before any parsing; None
    when it does not. An app that sends the same registration again (every re-sync does) is
    recognised by this alone: nothing is parsed or replaced."""
    if not isinstance(body, dict):
        return None
    app_id = body.get("appname", body.get("appName"))
    if not isinstance(app_id, str) or not app_id.strip():
        return None
    return app_id, checksum(body)


def checksum(body: dict[str, Any]) -> str:
    """What identifies a registration's content: its app, URL and function configs (SDK
    fields that change every sync, such as timestamps or signatures, are left out)."""
    app_id = body.get("appname", body.get("appName"))
    configs = body.get("functions")
    canonical = json.dumps({"app": app_id, "url": body.get("url"),
                            "functions": [] if configs is None else configs},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           default=repr)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _function(app_id: str, config: Any, where: str) -> tuple[FunctionDef, list[str]]:
    if not isinstance(config, dict):
        raise UserError(f"{where}: must be an object, got {kind_of(config)}")
    fn_id = config.get("id")
    if not isinstance(fn_id, str) or not fn_id:
        raise UserError(f"{where}.id: must be a non-empty string")
    name = config.get("name") if isinstance(config.get("name"), str) else ""
    step = (config.get("steps") or {}).get(ROOT_STEP) if isinstance(config.get("steps"), dict) \
        else None
    if not isinstance(step, dict):
        raise UserError(f"{where}.steps.{ROOT_STEP}: missing (where the SDK serves {fn_id!r})")
    runtime = step.get("runtime")
    url = runtime.get("url") if isinstance(runtime, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UserError(f"{where}.steps.{ROOT_STEP}.runtime.url: must be an http(s) URL "
                        "(connect/websocket apps are not supported)")
    retries_doc = step.get("retries")
    retries: Any = retries_doc.get("attempts") if isinstance(retries_doc, dict) else None
    if retries is None:
        retries = DEFAULT_RETRIES
    if type(retries) is not int or not 0 <= retries <= MAX_SDK_RETRIES:
        raise UserError(f"{where}.steps.{ROOT_STEP}.retries.attempts: must be an integer from "
                        f"0 to {MAX_SDK_RETRIES}, got {retries!r}")
    triggers = _triggers(config.get("triggers"), f"{where}.triggers")
    cancels = _cancels(config.get("cancel"), f"{where}.cancel")
    skipped = [key for key in IGNORED_CONFIG if config.get(key) not in (None, [], {})]
    flow = parse_sdk(config, where)
    fn = FunctionDef(id=fn_id, name=name or fn_id, app_id=app_id, triggers=tuple(triggers),
                     retries=retries, handler=_served_by_sdk(fn_id), cancel_on=tuple(cancels),
                     remote=url, flow=flow)
    return fn, skipped


def _triggers(value: Any, where: str) -> list[EventTrigger | CronTrigger]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: must be an array, got {kind_of(value)}")
    found: list[EventTrigger | CronTrigger] = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise UserError(f"{at}: must be an object, got {kind_of(item)}")
        try:
            if isinstance(item.get("cron"), str):
                found.append(CronTrigger(item["cron"]))
            elif isinstance(item.get("event"), str):
                expression = item.get("expression")
                found.append(parse_event_trigger(
                    item["event"], expression if isinstance(expression, str) and expression
                    else None))
            else:
                raise UserError("needs 'event' or 'cron'")
        except UserError as exc:
            raise UserError(f"{at}: {exc.message}") from None
    return found


def _cancels(value: Any, where: str) -> list[CancelTrigger]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: must be an array, got {kind_of(value)}")
    found: list[CancelTrigger] = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("event"), str):
            raise UserError(f"{at}: must be an object with an 'event'")
        condition = item.get("if")
        try:
            found.append(CancelTrigger(
                parse_event_trigger(item["event"]),
                Expression(condition) if isinstance(condition, str) and condition else None))
        except UserError as exc:
            raise UserError(f"{at}: {exc.message}") from None
    return found


def _served_by_sdk(fn_id: str) -> Handler:
    """The `handler` of an SDK function: never called, the runner sends its runs to the SDK."""
    async def served_by_sdk(ctx: Any) -> Any:
        raise RuntimeError(f"{fn_id} runs in its SDK app, not in this process")
    return served_by_sdk


def dev_function_doc(config: dict[str, Any]) -> dict[str, Any]:
    """A function as Inngest's dev server lists it in `GET /dev`: the SDK's config with its
    `steps` turned from the SDK's object (`{"step": {id, name, runtime: {url}, retries}}`)
    into Inngest's array of `{id, name, uri, retries}`, and its id as the `slug` too."""
    doc = dict(config)
    steps = config.get("steps")
    listed: list[dict[str, Any]] = []
    if isinstance(steps, dict):
        for key, step in steps.items():
            step = step if isinstance(step, dict) else {}
            runtime = step.get("runtime")
            entry: dict[str, Any] = {
                "id": text_of(step.get("id")) or key, "name": text_of(step.get("name")) or key,
                "uri": text_of(runtime.get("url")) if isinstance(runtime, dict) else ""}
            if isinstance(step.get("retries"), dict):
                entry["retries"] = step["retries"]
            listed.append(entry)
    elif isinstance(steps, list):
        listed = [step for step in steps if isinstance(step, dict)]
    doc["steps"] = listed
    if isinstance(config.get("id"), str):
        doc["slug"] = config["id"]
    return doc
