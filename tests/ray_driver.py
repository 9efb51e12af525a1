"""Run by tests/test_ray.py in a network namespace of its own: a local Ray, 2 replicas of an artifact behind Serve's
proxy, 16 requests through the openai client. Prints one JSON line with what the test asserts on."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from processes import descendants


def loopback_up() -> None:
    """`ip link set lo up` without iproute2 (a fresh network namespace starts with lo down)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def main(artifact: str, prompts_file: str, in_namespace: bool, drifted: str) -> None:
    if in_namespace:
        loopback_up()
    import httpx
    import openai
    import ray
    from ray import serve

    from neodeploy.runtime.engine import EngineConfig
    from neodeploy.serve.app import ServeOptions
    from neodeploy.serve.ray import Scaling, deployment

    jobs = json.load(open(prompts_file))
    metrics_port = 19000 + os.getpid() % 1000
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, _temp_dir=os.environ["RAY_TMPDIR"], _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ServeOptions(artifact, "tiny", engine=EngineConfig(max_running=4, max_waiting=16))
    serve.run(deployment(options, Scaling(replicas=2, cpus=1)), name="neodeploy", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health", timeout=5).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    ready_s = time.perf_counter() - started
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

    def one(job):
        prompt, n, stream = job
        if stream:
            raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=n,
                                                              temperature=0, stream=True)
            text = "".join(c.choices[0].text for c in raw.parse())
        else:
            raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
            text = raw.parse().choices[0].text
        return {"text": text, "replica": raw.headers.get("x-neodeploy-replica")}

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "best_of": 2})
    page = httpx.get(f"{url}/", timeout=10)  # the playground through Serve's proxy, with its script
    script = httpx.get(f"{url}/static/playground.js", timeout=10)
    # Each replica's engine metrics, through Ray's metrics export (what a cluster's Prometheus scrapes).
    exported: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        exported = {}
        for line in text.splitlines():
            if line.startswith("ray_neodeploy_generation_tokens_total{"):
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                exported[replica] = float(line.rsplit(" ", 1)[1])
        if len(exported) == 2 and sum(exported.values()) >= sum(n for _, n, _ in jobs) - len(jobs):
            break
        time.sleep(0.5)
    # A replica whose artifact drifted (weights changed, sha256 updated) never joins; the reason is one line.
    from neodeploy.serve.ray import _replica_error

    drift_error = None
    serve.delete("neodeploy")  # frees the node's 2 CPUs for the next replica
    try:
        serve.run(deployment(ServeOptions(drifted, "drift"), Scaling(replicas=1, cpus=1)), name="drift",
                  route_prefix="/drift")
    except Exception:  # noqa: BLE001 - what we assert on is the line below
        drift_error = _replica_error(serve)
    pids = sorted(descendants(os.getpid()))
    serve.shutdown()
    ray.shutdown()
    print(json.dumps({"answers": answers, "pids": pids, "ready_s": round(ready_s, 1), "bad_status": bad.status_code,
                      "bad_param": bad.json()["error"]["param"],
                      "page": [page.status_code, "playground.js" in page.text, script.status_code],
                      "exported_tokens": exported, "drift_error": drift_error}))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4])
