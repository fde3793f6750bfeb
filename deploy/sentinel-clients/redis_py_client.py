#!/usr/bin/env python3
"""Writes in a loop through redis-py's Sentinel client (PyPI `redis`).

usage: redis_py_client.py --sentinels HOST:PORT,HOST:PORT,... --group NAME
                          [--password-file FILE] [--duration-s N]

Prints one JSON line per write: {"client": "redis-py", "t": <unix s>,
"ok": true|false, "master": "HOST:PORT" (ok) | "error": "..." (failed)}.
The connection pool looks the master up again after every connection error
(and on READONLY), as redis-py does by itself.
"""
import argparse
import json
import sys
import time

from redis.sentinel import Sentinel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentinels", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--password-file")
    ap.add_argument("--duration-s", type=float, default=120.0)
    args = ap.parse_args()
    addrs = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.sentinels.split(","))]
    sentinel_kwargs = {"socket_timeout": 0.3, "socket_connect_timeout": 0.3}
    if args.password_file:
        with open(args.password_file) as f:
            sentinel_kwargs["password"] = f.read().strip()
    sentinel = Sentinel(addrs, sentinel_kwargs=sentinel_kwargs, socket_timeout=0.5)
    master = sentinel.master_for(args.group, socket_timeout=0.5, socket_connect_timeout=0.3)
    end = time.time() + args.duration_s
    i = 0
    while time.time() < end:
        i += 1
        line = {"client": "redis-py"}
        try:
            master.set("sentinel-client:redis-py", i)
            addr = getattr(master.connection_pool, "master_address", None)
            line.update(ok=True, master="%s:%s" % addr if addr else "")
        except Exception as e:  # every failure is a data point
            line.update(ok=False, error=type(e).__name__ + ": " + str(e)[:200])
        line["t"] = time.time()
        print(json.dumps(line), flush=True)
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
