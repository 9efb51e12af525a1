"""Soak a `neodeploy serve` process with mixed traffic; print its RSS every 15 s and latency per minute.

    python scripts/soak_serve.py ARTIFACT [--minutes 5] [--concurrency 4] [--api-key KEY]

Starts the server on a free loopback port (--max-running 4 --max-waiting 8), then runs `concurrency` clients for the
given time, each picking in turn: a streamed completion read to [DONE], a non-streaming one, a stream dropped after
its first token, a non-streaming request abandoned after 0.2 s, a chat completion (when the artifact has a
template) and a bad request. Reports per minute: requests, p50 / p99 latency of the completed ones, statuses; the
server's RSS every 15 s; at the end, whether every stream read to the end got [DONE] and nothing is left running.
Bounded: it stops by itself after --minutes and stops the server it started by its pid.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Soak:
    def __init__(self, url: str, key: str, model: str, chat: bool):
        self.url, self.model, self.chat = url, model, chat
        self.headers = {"Authorization": f"Bearer {key}"}
        self.lock = threading.Lock()
        self.latency: dict[int, list[float]] = defaultdict(list)
        self.statuses: dict[int, Counter] = defaultdict(Counter)
        self.streams_done = self.streams_without_done = 0
        self.start = time.monotonic()

    def record(self, seconds: float | None, status: int | str) -> None:
        minute = int((time.monotonic() - self.start) // 60)
        with self.lock:
            self.statuses[minute][status] += 1
            if seconds is not None:
                self.latency[minute].append(seconds)

    def one(self, client: httpx.Client, kind: str, rng: random.Random) -> None:
        body = {"model": self.model, "prompt": rng.choice(["Hello", "Once upon a time", "def main():", "1, 2, 3"]),
                "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.8])}
        url, start = f"{self.url}/v1/completions", time.monotonic()
        try:
            if kind == "stream":
                with client.stream("POST", url, json={**body, "stream": True}, headers=self.headers) as r:
                    events = [line for line in r.iter_lines() if line]
                with self.lock:
                    if events and events[-1] == "data: [DONE]":
                        self.streams_done += 1
                    else:
                        self.streams_without_done += 1
                self.record(time.monotonic() - start, r.status_code)
            elif kind == "drop":
                with client.stream("POST", url, json={**body, "stream": True, "max_tokens": 500}, headers=self.headers) as r:
                    next(line for line in r.iter_lines() if line)
                self.record(None, "dropped")
            elif kind == "abandon":
                try:
                    client.post(url, json={**body, "max_tokens": 1500}, headers=self.headers, timeout=0.2)
                    self.record(None, "abandoned-finished")
                except httpx.TimeoutException:
                    self.record(None, "abandoned")
            elif kind == "chat" and self.chat:
                r = client.post(f"{self.url}/v1/chat/completions", headers=self.headers, json={
                    "model": self.model, "messages": [{"role": "user", "content": body["prompt"]}],
                    "max_tokens": body["max_tokens"]})
                self.record(time.monotonic() - start, r.status_code)
            elif kind == "bad":
                r = client.post(url, json={**body, "temperature": "hot"}, headers=self.headers)
                self.record(None, r.status_code)
            else:
                r = client.post(url, json=body, headers=self.headers)
                self.record(time.monotonic() - start, r.status_code)
        except httpx.HTTPError as exc:
            self.record(None, type(exc).__name__)

    def client(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        kinds = ["stream", "plain", "stream", "plain", "drop", "abandon", "chat", "bad"]
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < deadline:
                self.one(client, rng.choice(kinds), rng)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--api-key", default="soak-key")
    args = parser.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "neodeploy", "serve", args.artifact, "--port", str(port),
                               "--model-name", "soak", "--max-running", "4", "--max-waiting", "8"],
                              env={**os.environ, "NEODEPLOY_API_KEY": args.api_key}, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        chat = "chat template" not in httpx.post(f"{url}/v1/chat/completions", headers={
            "Authorization": f"Bearer {args.api_key}"}, json={"model": "soak", "messages": [
                {"role": "user", "content": "hi"}], "max_tokens": 1}).text
        soak = Soak(url, args.api_key, "soak", chat)
        deadline = time.monotonic() + args.minutes * 60
        workers = [threading.Thread(target=soak.client, args=(deadline, i)) for i in range(args.concurrency)]
        for w in workers:
            w.start()
        print(f"soak: {args.minutes:g} min, {args.concurrency} clients, server pid {server.pid}, chat {chat}")
        while time.monotonic() < deadline:
            print(f"  t={time.monotonic() - soak.start:5.0f} s  RSS {_rss_mb(server.pid):6.1f} MB", flush=True)
            time.sleep(min(15, max(0.0, deadline - time.monotonic())))
        for w in workers:
            w.join()
        print(f"  t={time.monotonic() - soak.start:5.0f} s  RSS {_rss_mb(server.pid):6.1f} MB (end)")
        print("minute | requests | p50 ms | p99 ms | statuses")
        for minute in sorted(soak.statuses):
            lat = soak.latency[minute]
            print(f"{minute:6d} | {sum(soak.statuses[minute].values()):8d} | {_percentile(lat, 0.5) * 1000:6.0f} | "
                  f"{_percentile(lat, 0.99) * 1000:6.0f} | {dict(soak.statuses[minute])}")
        time.sleep(1)
        metrics = httpx.get(f"{url}/metrics").text
        idle = "neodeploy_running_requests 0.0" in metrics and "neodeploy_waiting_requests 0.0" in metrics
        print(f"streams read to the end: {soak.streams_done} with [DONE], {soak.streams_without_done} without; "
              f"server idle after: {idle}; health {httpx.get(f'{url}/health').status_code}")
        return 0 if soak.streams_without_done == 0 and idle else 1
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
