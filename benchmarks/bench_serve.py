"""Online serving benchmark (issue #11): `mae-deploy serve` under 1, 8 and 32 concurrent clients.

ViT-B/16 (random init, exported encoder, fp32 and int8), single 224x224 JPEG photos (crops of scikit-image
photos) per request, on this CPU. For each precision, in the same run:

- offline: encode-only images/s on the decoded images in batches of 32 (the ceiling of `mae-deploy extract`,
  whose decode workers overlap inference), ``FeatureExtractor.extract`` images/s (decode, preprocess and
  encode in turn), and the runner's batch-1 latency (p50 of encode on one preprocessed image);
- online: the server (a subprocess: uvicorn + the micro-batcher, default batching, --max-delay-ms 0; a long
  --timeout-s and --max-queue so a slow machine measures latency instead of 504/503) and
  1 / 8 / 32 client threads, each sending one image per request in a loop: images/s, p50/p90/p99 latency,
  mean batch size (from /metrics), and per request the server's runner call that carried it (the
  `Server-Timing` header) and the rest, latency minus that call: what serving adds (HTTP, decode,
  preprocessing, the wait for a batch, pooling, JSON). Warm-up requests are outside the clock and counters.

Targets (issue #11): 32 clients >= 85 % of offline images/s (here: of encode-only, the stricter baseline);
1 client p50 <= batch-1 latency + 5 ms, judged against the server's own batch-1 runner calls on the same
requests; the offline batch-1 latency, measured before and again after the online levels in its own process,
is shown beside it (on a shared VM it drifts between runs by more than the 5 ms margin).

    python benchmarks/bench_serve.py                  # appends a section to benchmarks/RESULTS.md
    python benchmarks/bench_serve.py --requests 64 --no-append

Client threads run on the same 2 cores as the server, so they take some CPU from it; the numbers err
against the server. Load average is recorded: other processes lower every number.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Online serving (issue #11)"
MODEL = "mae_vit_base_patch16"


def export(dst: Path) -> Path:
    """ViT-B/16 encoder, random init, fp32 + dynamic int8 (cached in ``dst``)."""
    if (dst / "mae.json").is_file():
        return dst
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    export_bundle(
        create_model(MODEL).eval(), dst, precisions=("fp32", "int8"), parts=["encoder"], verify=False, progress=None
    )
    return dst


def make_jpegs(dst: Path, n: int) -> list[Path]:
    """n 224x224 JPEGs: random crops of scikit-image photos, resized."""
    from PIL import Image
    from skimage import data

    dst.mkdir(parents=True, exist_ok=True)
    photos = [
        Image.fromarray(getattr(data, k)()).convert("RGB")
        for k in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    ]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = dst / f"img{i:04d}.jpg"
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im.crop((x, y, x + cw, y + ch)).resize((224, 224)).save(p, quality=90)
        paths.append(p)
    return paths


def offline(bundle: Path, precision: str, paths: list[Path]) -> dict:
    """Offline images/s on the same runner settings, and its batch-1 encode latency.

    ``model_ips``: encode only, batches of 32 already decoded (the ceiling of `mae-deploy extract`, whose
    decode workers overlap inference: it reached 98.8 % of this in the issue-#5 benchmark); ``offline_ips``:
    ``FeatureExtractor.extract`` (decode, preprocess, encode in turn, batch 32).
    """
    from mae_deploy.features import FeatureExtractor

    with FeatureExtractor(bundle, precision=precision, batch_size=32) as fx:
        fx.extract(paths[:32])  # warm-up
        t0 = time.perf_counter()
        fx.extract(paths)
        ips = len(paths) / (time.perf_counter() - t0)
        x = fx.preprocessor(paths)
        t0 = time.perf_counter()
        for s in range(0, len(x), 32):
            fx.extract_pixels(x[s : s + 32])
        model_ips = len(x) / (time.perf_counter() - t0)
        batch1 = _batch1_p50_ms(fx, x[:1])
    return {"offline_ips": ips, "model_ips": model_ips, "batch1_p50_ms": batch1}


def batch1_after(bundle: Path, precision: str, path: Path) -> float:
    """The offline batch-1 encode p50 again, after the online levels: how far the runner drifted meanwhile."""
    from mae_deploy.features import FeatureExtractor

    with FeatureExtractor(bundle, precision=precision, batch_size=1) as fx:
        return _batch1_p50_ms(fx, fx.preprocessor([path]), warm_up=8)


def _batch1_p50_ms(fx, x: np.ndarray, warm_up: int = 2) -> float:
    """p50 of 24 encode calls on one preprocessed image, after ``warm_up`` untimed ones."""
    from mae_deploy.masking import all_visible

    ids, _, _ = all_visible(1, fx.bundle.num_patches)
    times = []
    for _ in range(warm_up + 24):
        t = time.perf_counter()
        fx.runner.encode(x, ids)
        times.append(time.perf_counter() - t)
    return float(np.median(times[warm_up:]) * 1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    vals = {}
    for name in ("sum", "count"):
        m = re.search(rf'^mae_serve_batch_size_{name}\{{part="encoder"\}} (\S+)$', text, re.M)
        vals[name] = float(m.group(1)) if m else 0.0
    return vals["sum"], vals["count"]


def start_server(bundle: Path, precision: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    code = "from mae_deploy.commands.serve import serve; serve()"  # the click command itself
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(bundle),
            "--port",
            str(port),
            "--precision",
            precision,
            "--max-queue",
            "1024",
            "--timeout-s",
            "600",
        ],
        cwd=ROOT,
        stderr=open(log, "w"),
    )  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server not ready after 120 s; see {log}")


def _timing_ms(header: str, name: str) -> float:
    """One entry of a Server-Timing header ('preprocess;dur=2.1, runner;dur=180.3, ...'), in ms."""
    from mae_deploy.serve.metrics import parse_server_timing

    timings = parse_server_timing(header)
    if name not in timings:
        raise SystemExit(f"the server sent no Server-Timing {name!r} entry (got {header!r})")
    return timings[name]


class _Client:
    """One keep-alive HTTP/1.1 connection from the standard library's http.client.

    The clients share the server's 2 cores; http.client costs about 1 ms less CPU per request than httpx here
    (measured), so it takes less from the server it measures.
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=300)

    def post_image(self, body: bytes) -> str:
        """POST one JPEG to /v1/features; the response's Server-Timing header."""
        try:
            r = self._post(body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # uvicorn closes a connection idle for 5 s (its keep-alive timeout), e.g. while this client waited
            # at the barrier for the others' warm-ups; reconnect once, as httpx or requests would
            self.conn.close()
            r = self._post(body)
        if r.status != 200:
            raise SystemExit(f"the server answered {r.status} {r.reason}")
        return r.getheader("Server-Timing", "")

    def _post(self, body: bytes) -> http.client.HTTPResponse:
        self.conn.request("POST", "/v1/features", body=body, headers={"Content-Type": "image/jpeg"})
        r = self.conn.getresponse()
        r.read()
        return r

    def close(self) -> None:
        self.conn.close()


def load_level(url: str, blobs: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` threads share ``requests`` single-image requests; latency per request, images/s overall.

    Each client first sends one untimed request (connection and thread warm-up); the clock and the batch
    counters start when the last client is through it (the barrier), so warm-up work is in neither. Per
    request, ``runner`` is the server's runner call that carried it (Server-Timing) and the overhead is the
    client's latency minus that: HTTP, decoding, preprocessing, the wait for a batch, pooling, JSON.
    """
    per_client = max(2, requests // clients)
    latencies: list[float] = []
    runner: list[float] = []
    lock = threading.Lock()
    start: dict[str, float] = {}

    def at_barrier() -> None:  # runs once, in one client thread, when every client is warmed up
        start["sum"], start["count"] = _batch_stats(url)
        start["t"] = time.perf_counter()

    barrier = threading.Barrier(clients, action=at_barrier)

    def client(k: int) -> None:
        c = _Client(url)
        try:
            c.post_image(blobs[k % len(blobs)])  # warm the connection
            barrier.wait(300)
            mine, mine_runner = [], []
            for i in range(per_client):
                t = time.perf_counter()
                timing = c.post_image(blobs[(k * per_client + i) % len(blobs)])
                mine.append((time.perf_counter() - t) * 1000)
                mine_runner.append(_timing_ms(timing, "runner"))
        finally:
            c.close()
        with lock:
            latencies.extend(mine)
            runner.extend(mine_runner)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start["t"]
    s1, n1 = _batch_stats(url)
    lat = np.array(latencies)
    overhead = lat - np.array(runner)
    return {
        "clients": clients,
        "requests": len(lat),
        "ips": len(lat) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "runner_p50_ms": float(np.percentile(runner, 50)),
        "overhead_p50_ms": float(np.percentile(overhead, 50)),
        "mean_batch": (s1 - start["sum"]) / max(1.0, n1 - start["count"]),
    }


def run(args) -> dict:
    work = Path(args.work)
    bundle = export(work / "bundle")
    paths = make_jpegs(work / "jpegs", args.images)
    blobs = [p.read_bytes() for p in paths]
    out = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu(),
        "load_before": os.getloadavg()[0],
        "precisions": {},
    }
    for precision in args.precisions.split(","):
        print(f"== {precision}: offline", flush=True)
        res = offline(bundle, precision, paths)
        print(f"   {res}", flush=True)
        proc, url = start_server(bundle, precision, work / f"server-{precision}.log")
        try:
            levels = []
            for clients in (1, 8, 32):
                n = args.requests if clients > 1 else max(8, args.requests // 4)
                levels.append(load_level(url, blobs, clients, n))
                print(f"   {levels[-1]}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        res["levels"] = levels
        res["batch1_after_p50_ms"] = batch1_after(bundle, precision, paths[0])
        print(f"   batch-1 after: {res['batch1_after_p50_ms']:.1f} ms", flush=True)
        out["precisions"][precision] = res
    out["load_after"] = os.getloadavg()[0]
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


def markdown(res: dict) -> str:
    lines = [
        SECTION,
        "",
        "ViT-B/16 encoder (random init), ORT on CPU, single 224x224 JPEG per request; server = "
        "`mae-deploy serve` defaults (--max-delay-ms 0, --max-batch-size 32) but --timeout-s 600 and --max-queue "
        "1024 (a slow machine must not turn the measurement into 504s). "
        f"Measured {res['date']} on {res['cpu']}; load "
        f"average {res['load_before']:.1f} before, {res['load_after']:.1f} after (other processes share the "
        "2 cores; clients run on them too).",
        "",
        "| precision | clients | requests | images/s | vs offline | p50 ms | p90 ms | p99 ms "
        "| server runner call p50 ms | latency - runner call p50 ms | mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for prec, r in res["precisions"].items():
        lines.append(
            f"| {prec} | offline: encode only, batch 32 (decoded) | | {r['model_ips']:.1f} | 1.00x | "
            f"batch-1 encode p50 {r['batch1_p50_ms']:.1f} | | | | | 32 |"
        )
        lines.append(
            f"| {prec} | offline: FeatureExtractor.extract, batch 32 | | {r['offline_ips']:.1f} | "
            f"{r['offline_ips'] / r['model_ips']:.2f}x | | | | | | 32 |"
        )
        for lv in r["levels"]:
            lines.append(
                f"| {prec} | {lv['clients']} | {lv['requests']} | {lv['ips']:.1f} | "
                f"{lv['ips'] / r['model_ips']:.2f}x | {lv['p50_ms']:.1f} | {lv['p90_ms']:.1f} | "
                f"{lv['p99_ms']:.1f} | {lv['runner_p50_ms']:.1f} | {lv['overhead_p50_ms']:.1f} | "
                f"{lv['mean_batch']:.1f} |"
            )
    lines.append("")
    for prec, r in res["precisions"].items():
        lines.append(_verdict(prec, r))
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _verdict(prec: str, r: dict) -> str:
    """The two targets, each said met or not. The lone-request one is judged on the same requests' runner call
    (the runner's batch-1 latency in the server, at the same time): a batch-1 encode measured minutes apart in
    another process drifts by more than the 5 ms margin on a shared VM, so that comparison is shown beside it."""
    one, many = r["levels"][0], r["levels"][-1]
    share = many["ips"] / r["model_ips"]
    limit = one["runner_p50_ms"] + 5
    before, after = r["batch1_p50_ms"], r.get("batch1_after_p50_ms")
    offline = f"{before:.1f} ms before" + (f", {after:.1f} ms after" if after is not None else "")
    return (
        f"- {prec}: 32 clients at {share:.0%} of offline encode-only images/s "
        f"({many['ips'] / r['offline_ips']:.0%} of FeatureExtractor; target >= 85 %: {_met(share >= 0.85)}). "
        f"1 client p50 {one['p50_ms']:.1f} ms vs the server's batch-1 runner call {one['runner_p50_ms']:.1f} ms "
        f"+ 5 ms = {limit:.1f} ms ({_met(one['p50_ms'] <= limit)}); per request, latency minus its runner call: "
        f"{one['overhead_p50_ms']:.1f} ms p50. Offline batch-1 encode in its own process: {offline} the online "
        f"levels (the first + 5 ms: {_met(one['p50_ms'] <= before + 5)})."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mae-bench-serve"))
    ap.add_argument("--images", type=int, default=64, help="distinct JPEGs (offline run and request bodies)")
    ap.add_argument("--requests", type=int, default=128, help="timed requests per level (1 client: a quarter)")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--no-append", action="store_true", help="print, do not append to benchmarks/RESULTS.md")
    ap.add_argument("--from-json", default=None, help="only format (and append) the results of an earlier --json")
    args = ap.parse_args()
    if args.from_json:
        md = markdown(json.loads(Path(args.from_json).read_text()))
        print(md)
        if not args.no_append:
            with open(RESULTS, "a") as f:
                f.write("\n" + md)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server subprocess
    res = run(args)
    md = markdown(res)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + md)


if __name__ == "__main__":
    main()
