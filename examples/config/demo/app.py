"""A demo application for scripts/proxy-demo (python3 standard library only).

    python3 app.py NAME PORT [UPSTREAM]

Listens on 127.0.0.1:PORT. Without UPSTREAM it answers every request with what it saw:
the request line and its headers, x-mesh-client-id (the caller's verified SPIFFE ID, set
by the inbound proxy) among them. With UPSTREAM (a base URL: the local proxy's outbound
listener) it calls UPSTREAM + /api + the request's path and answers with the status and
body it got back. /healthz is always answered locally.
"""

import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]
PORT = int(sys.argv[2])
UPSTREAM = sys.argv[3] if len(sys.argv) > 3 else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/healthz":
            self.answer(200, "ok\n")
            return
        if UPSTREAM is None:
            headers = "".join(f"    {k}: {v}\n" for k, v in self.headers.items())
            body = f"{NAME} app saw {self.command} {self.path} {self.request_version}\n{headers}"
            self.answer(200, body)
            return
        url = UPSTREAM + "/api" + self.path
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        except OSError as e:
            status, text = 502, f"{e}\n"
        text = text.rstrip().replace("\n", "\n  ")
        self.answer(200, f"{NAME} app called GET {url}: {status}\n  {text}\n")

    do_POST = do_GET

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
