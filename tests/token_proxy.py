#!/usr/bin/env python3
"""The distribution spec's token flow in front of a real registry, for Ferry's model tests
(Python 3 standard library only).

    token_proxy.py UPSTREAM_PORT USER PASSWORD

Prints "PORT <n>" once listening on 127.0.0.1. Every /v2/ request needs
`Authorization: Bearer <token>`; without one the answer is 401 with
`WWW-Authenticate: Bearer realm="http://127.0.0.1:<n>/token",service="ferry-test",scope=...`.
GET /token?service=..&scope=.. with Basic USER:PASSWORD answers {"token": ...} (else 401).
Authorized requests are forwarded to the registry on UPSTREAM_PORT (Range and bodies
included) and its answers returned, Location rewritten to this proxy.
GET /_stats: {"tokens": issued, "unauthorized": 401s sent, "forwarded": n, "scopes": [...]}.
"""
import base64
import http.client
import http.server
import json
import secrets
import sys
import threading
import urllib.parse

UPSTREAM = int(sys.argv[1])
USER, PASSWORD = sys.argv[2], sys.argv[3]
TOKENS = set()
STATS = {"tokens": 0, "unauthorized": 0, "forwarded": 0, "scopes": []}
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def token(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            with LOCK:
                STATS["unauthorized"] += 1
            return self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
        token = secrets.token_hex(16)
        with LOCK:
            TOKENS.add(token)
            STATS["tokens"] += 1
            STATS["scopes"].append(query.get("scope", [""])[0])
        self.reply(200, json.dumps({"token": token, "expires_in": 300}).encode(),
                   {"Content-Type": "application/json"})

    def handle_any(self):
        path = urllib.parse.urlparse(self.path).path
        if path == "/token":
            return self.token()
        if path == "/_stats":
            with LOCK:
                body = json.dumps(STATS).encode()
            return self.reply(200, body, {"Content-Type": "application/json"})
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        auth = self.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and auth[7:] in TOKENS):
            parts = path.split("/")
            repo = "/".join(parts[2:-2]) if len(parts) > 4 else ""
            action = "pull" if self.command in ("GET", "HEAD") else "pull,push"
            port = self.server.server_address[1]
            challenge = (f'Bearer realm="http://127.0.0.1:{port}/token",service="ferry-test",'
                         f'scope="repository:{repo}:{action}"')
            with LOCK:
                STATS["unauthorized"] += 1
            return self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                              {"WWW-Authenticate": challenge})
        conn = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("authorization", "host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = {}
        for k, v in resp.getheaders():
            if k.lower() in ("content-length", "connection", "transfer-encoding"):
                continue
            if k.lower() == "location":
                v = v.replace(f"127.0.0.1:{UPSTREAM}", f"127.0.0.1:{self.server.server_address[1]}")
            out[k] = v
        with LOCK:
            STATS["forwarded"] += 1
        self.send_response(resp.status)
        for k, v in out.items():
            self.send_header(k, v)
        self.send_header("Content-Length", resp.getheader("Content-Length", str(len(data))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"PORT {server.server_address[1]}", flush=True)
server.serve_forever()
