#!/usr/bin/env python3
"""A loopback HTTP origin for Ferry's back-to-source tests and benchmark (stdlib only).

Serves the files under --root with single-range `Range` support, a strong ETag and
Last-Modified, on HTTP/1.1 keep-alive connections. Faults are chosen per request by query
parameters (they are part of the URL, so each faulty URL is its own task):

  stall=N          send N bytes of each body, then stop sending (the connection stays open)
  truncate=N       announce the full length, send N bytes of each body, then close
  fail=K           answer 503 to the first K requests for this URL
  change_after=K   after K requests for this URL, serve other bytes under another ETag
  norange=1        ignore Range: always 200 with the whole file
  redirect=1       answer 302 to the same URL without `redirect=1`
  auth=TOKEN       answer 401 unless `Authorization: Bearer TOKEN` was sent
  delay_ms=N       wait N ms before each body (a slow origin)

GET /_stats answers JSON: per URL, the requests, the ranged requests, the statuses sent and the
body bytes sent (`bytes`).
Prints `PORT <n>` on stdout once listening.
"""

import argparse
import email.utils
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATS = {}
ROOT = "."


def count(key, field, sub=None):
    with LOCK:
        entry = STATS.setdefault(key, {"requests": 0, "ranged": 0, "status": {}, "bytes": 0})
        if sub is None:
            entry[field] += 1
        else:
            entry[field][sub] = entry[field].get(sub, 0) + 1
        return entry["requests"]


def count_bytes(key, n):
    with LOCK:
        entry = STATS.setdefault(key, {"requests": 0, "ranged": 0, "status": {}, "bytes": 0})
        entry["bytes"] += n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def simple(self, code, body=b"", extra=()):
        count(self.path, "status", str(code))
        self.send_response(code)
        for name, value in extra:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/_stats":
            with LOCK:
                body = json.dumps(STATS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        query = dict(urllib.parse.parse_qsl(url.query))
        seen = count(self.path, "requests")
        if "auth" in query and self.headers.get("Authorization") != "Bearer " + query["auth"]:
            return self.simple(401, b"unauthorized\n")
        if query.get("redirect") == "1":
            rest = [(k, v) for k, v in urllib.parse.parse_qsl(url.query) if k != "redirect"]
            target = url.path + ("?" + urllib.parse.urlencode(rest) if rest else "")
            return self.simple(302, extra=[("Location", target)])
        if seen <= int(query.get("fail", "0")):
            return self.simple(503, b"try again\n")
        path = os.path.join(ROOT, url.path.lstrip("/"))
        if ".." in url.path.split("/") or not os.path.isfile(path):
            return self.simple(404, b"not found\n")
        st = os.stat(path)
        size = st.st_size
        changed = "change_after" in query and seen > int(query["change_after"])
        etag = '"%x-%x%s"' % (st.st_mtime_ns, size, "-b" if changed else "")
        modified = email.utils.formatdate(st.st_mtime + (3600 if changed else 0), usegmt=True)
        start, end, code = 0, size - 1, 200
        header = self.headers.get("Range")
        if header and query.get("norange") != "1":
            count(self.path, "ranged")
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
            if not match or (match.group(1) == "" and match.group(2) == ""):
                return self.simple(416, extra=[("Content-Range", "bytes */%d" % size)])
            if match.group(1) == "":
                start, end = max(0, size - int(match.group(2))), size - 1
            else:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size or start > end:
                return self.simple(416, extra=[("Content-Range", "bytes */%d" % size)])
            code = 206
        length = end - start + 1 if size else 0
        count(self.path, "status", str(code))
        self.send_response(code)
        self.send_header("Accept-Ranges", "none" if query.get("norange") == "1" else "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if code == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        if "delay_ms" in query:
            time.sleep(int(query["delay_ms"]) / 1000.0)
        limit = length
        if "stall" in query:
            limit = min(limit, int(query["stall"]))
        if "truncate" in query:
            limit = min(limit, int(query["truncate"]))
        with open(path, "rb") as f:
            if changed:
                f.seek(start)
                left = limit
                while left > 0:
                    block = f.read(min(left, 1 << 20))
                    mask = int.from_bytes(b"\x5a" * len(block), "little")
                    flipped = int.from_bytes(block, "little") ^ mask
                    self.wfile.write(flipped.to_bytes(len(block), "little"))
                    left -= len(block)
                    count_bytes(self.path, len(block))
            else:
                sock = self.connection.fileno()
                offset, left = start, limit
                while left > 0:
                    sent = os.sendfile(sock, f.fileno(), offset, min(left, 1 << 30))
                    if sent == 0:
                        break
                    offset += sent
                    left -= sent
                    count_bytes(self.path, sent)
        if limit < length:
            if "stall" in query:
                time.sleep(3600)
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # A client that hung up mid-body (after a stall or a failed check) is expected.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def main():
    global ROOT
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    ROOT = args.root
    server = Server((args.bind, args.port), Handler)
    print("PORT %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
