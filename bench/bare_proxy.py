"""The benchmark's reference: a bare aiohttp pass-through proxy with no logic at all.

Why this exists: "how fast is the sidecar" only means something next to "how fast is the same stack doing
nothing": this proxy uses what the sidecar uses (aiohttp server, one pooled aiohttp client session,
uvloop) and only forwards `POST /anthropic/<path>` to `<upstream>/<path>` — body in, status, content type
and body out, streams chunk by chunk. Its CPU per request is the floor the sidecar's logic adds to.

    python bench/bare_proxy.py --listen 127.0.0.1:9000 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import aiohttp
from aiohttp import web


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024), timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",))
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-type", "x-api-key", "anthropic-version", "authorization")}
        url = upstream + "/" + request.match_info["tail"]
        async with request.app[session_key].post(url, data=body, headers=headers) as upstream_response:
            content_type = upstream_response.headers.get("Content-Type", "application/json")
            if content_type.startswith("text/event-stream"):
                response = web.StreamResponse(status=upstream_response.status,
                                              headers={"Content-Type": content_type})
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            data = await upstream_response.read()
            return web.Response(status=upstream_response.status, body=data,
                                headers={"Content-Type": content_type})

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/anthropic/{tail:.*}", forward)
    app.router.add_get("/healthz", lambda request: _ok())
    return app


async def _ok() -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # The sidecar's own collector tuning (llmroute_sidecar.cli._tune_gc), so the ratio compares logic only.
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, *gc.get_threshold()[1:])
    host, _, port = args.listen.rpartition(":")
    web.run_app(make_app(args.upstream.rstrip("/")), host=host, port=int(port), access_log=None,
                print=None, handler_cancellation=True, backlog=1024)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
