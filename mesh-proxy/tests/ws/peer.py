"""WebSocket peers for mesh-proxy's tests (the `websockets` library: someone else's client
and server, speaking RFC 6455 over a real HTTP/1.1 upgrade).

    peer.py server             echo server on 127.0.0.1, any free port; prints "port N".
                               The first message of a connection is answered with the
                               handshake's path and x-mesh-client-id header
                               ("hello PATH ID"); every other one is echoed.
    peer.py client URL N       connects to URL, checks the greeting, echoes N text messages
                               and one 1 MiB binary message, closes cleanly; prints
                               "ok PATH ID" from the greeting.
    peer.py status URL         prints the HTTP status a refused handshake got ("status N"),
                               or "open" if it switched.
    peer.py quiet URL          connects, checks the greeting, then sends nothing and waits
                               (at most 30 s) for the connection to be closed; prints
                               "closed after S" (seconds, one decimal).

A wss:// URL is verified against the CA file in $MESH_WS_CA.
"""
import asyncio
import os
import ssl
import sys
import time

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def server():
    async def handler(ws):
        greeting = await ws.recv()
        ident = ws.request.headers.get("x-mesh-client-id", "-")
        await ws.send(f"hello {ws.request.path} {ident} {greeting}")
        async for message in ws:
            await ws.send(message)

    async with serve(handler, "127.0.0.1", 0, max_size=4 << 20) as srv:
        port = srv.sockets[0].getsockname()[1]
        print(f"port {port}", flush=True)
        await asyncio.get_running_loop().create_future()


def tls(url):
    """The client's TLS settings for a wss:// URL: trust $MESH_WS_CA only."""
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=os.environ["MESH_WS_CA"])


async def client(url, n):
    async with connect(
        url, ssl=tls(url), max_size=4 << 20, open_timeout=10, close_timeout=10
    ) as ws:
        await ws.send("hi")
        greeting = await asyncio.wait_for(ws.recv(), 10)
        words = greeting.split(" ")
        assert words[0] == "hello" and words[3] == "hi", greeting
        for i in range(n):
            text = f"message {i} " + "x" * i
            await ws.send(text)
            echoed = await asyncio.wait_for(ws.recv(), 10)
            assert echoed == text, (echoed, text)
        blob = os.urandom(1 << 20)
        await ws.send(blob)
        echoed = await asyncio.wait_for(ws.recv(), 10)
        assert echoed == blob, "binary message changed on its way"
        print(f"ok {words[1]} {words[2]}", flush=True)


async def quiet(url):
    # No keepalive pings of the library's own: nothing crosses while it waits.
    async with connect(url, ssl=tls(url), open_timeout=10, ping_interval=None) as ws:
        await ws.send("hi")
        await asyncio.wait_for(ws.recv(), 10)
        started = time.monotonic()
        try:
            await asyncio.wait_for(ws.recv(), 30)
        except websockets.exceptions.ConnectionClosed:
            pass
        print(f"closed after {time.monotonic() - started:.1f}", flush=True)


async def status(url):
    try:
        async with connect(url, ssl=tls(url), open_timeout=10):
            print("open", flush=True)
    except websockets.exceptions.InvalidStatus as e:
        print(f"status {e.response.status_code}", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        asyncio.run(server())
    elif mode == "client":
        asyncio.run(client(sys.argv[2], int(sys.argv[3])))
    elif mode == "quiet":
        asyncio.run(quiet(sys.argv[2]))
    else:
        asyncio.run(status(sys.argv[2]))
