"""The web layer: `server` wires store, runtime and routes into an aiohttp app; `api` holds the
JSON API handlers and the documents they return; `dashboard` renders those same documents as
HTML pages; `sdk_routes` answers the SDKs (`/fn/register`, `/dev`, app syncs).

Handlers only translate requests and responses: what they do is in the layers below.
"""
