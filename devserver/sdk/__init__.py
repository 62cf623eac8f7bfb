"""Inngest SDK apps over HTTP: `protocol` (the wire format as plain data and named constants),
`registration` (an app's config into function definitions), `executor` (runs over the call
protocol), `apps` (syncing, re-syncing and discovering apps).

It sits on the runtime; its HTTP routes are in `devserver.web.sdk_routes`.
"""
