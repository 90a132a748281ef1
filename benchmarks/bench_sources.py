"""Reading + decoding rate of the same JPEGs as a folder, as WebDataset shards and as Parquet; peak RSS of
planning and reading as the number of shards grows.

What the sources change is how a row's bytes arrive (one open per file, or one seek in an open shard / one
row group), so this measures the decode stage alone (the `extract` Decoder: read, decode, resize, crop) in one
process, every kind in the same run, reported as ratios to the folder. RSS: a child process plans and reads a
source of the same total size split into 4, 16 or 64 shards.

    python benchmarks/bench_sources.py [--images 2000] [--side 320] [--rounds 5]
    python benchmarks/bench_sources.py --s3 --images 1000      # the same, read from an S3 endpoint

``--s3`` uploads the three copies to an S3-compatible server started on 127.0.0.1 (moto's, as the tests use)
and reads them through ``s3://``: where every image of a folder is one request and a shard or row group
serves many, which is what the kinds are for. A local server has none of a real store's latency, so the
folder's request overhead is a lower bound here.
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PRE = {
    "image_size": 224,
    "resize": "shorter_side_crop",
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def make_folder(root: Path, n: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=0)).resize((side, side * 3 // 4), Image.BILINEAR)
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (d / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    return root


def rate(spec: str) -> tuple[float, int]:
    from mae_deploy.extract.decode import Decoder
    from mae_deploy.sources import list_source

    src = list_source(spec)
    dec = Decoder(PRE, 3, 16, 0, "uint8", reader=src.reader)
    items = list(enumerate(src.paths))
    t0 = time.perf_counter()
    for a in range(0, len(items), 32):
        d = dec.decode_batch(items[a : a + 32])
        assert not d.failures, d.failures[:1]
    return len(items) / (time.perf_counter() - t0), len(items)


def read_rate(spec: str) -> float:
    """Rows per second of reading the bytes alone (what the source kind changes)."""
    from mae_deploy.sources import list_source

    src = list_source(spec)
    t0 = time.perf_counter()
    for row, path in enumerate(src.paths):
        src.reader.read(row, path)
    return len(src) / (time.perf_counter() - t0)


def rss_child(spec: str) -> float:
    code = (
        f"import sys, resource; sys.path.insert(0, {str(REPO)!r}); from mae_deploy.sources import list_source; "
        f"s = list_source({spec!r}); [s.reader.read(r, p) for r, p in enumerate(s.paths)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def start_s3() -> object:
    """moto's S3 server on 127.0.0.1 (a free port), the environment pointed at it; returns the server."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return server


def upload(tmp: Path, kinds: tuple[str, ...]) -> dict[str, str]:
    """Each local copy uploaded to s3://bench/<kind>; kind -> URL."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    for kind in kinds:
        fs.put(str(tmp / kind), f"bench/{kind}", recursive=True)
    return {kind: f"s3://bench/{kind}" for kind in kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--s3", action="store_true", help="read the copies from an S3 server on 127.0.0.1 (moto)")
    args = ap.parse_args()
    from mae_deploy.sources.pack import write_parquet, write_shards

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_folder(tmp / "folder", args.images, args.side)
        write_shards(folder, tmp / "wds", per_shard=500)
        write_parquet(folder, tmp / "pq", per_file=1000, row_group=128)
        kinds = ("folder", "wds", "pq")
        where = {k: str(tmp / k) for k in kinds}
        server = start_s3() if args.s3 else None
        if server is not None:
            where = upload(tmp, kinds)
        print(
            f"# bench_sources: {args.images} JPEGs {args.side}x{args.side * 3 // 4}, one process, CPU: {cpu}"
            + (", from s3:// (moto on 127.0.0.1)" if server is not None else ", local files")
        )
        reads = {k: 0.0 for k in kinds}
        rates = {k: 0.0 for k in kinds}
        for _ in range(args.rounds):  # interleaved, best of the rounds: other load on a shared machine is noise
            for name in kinds:
                reads[name] = max(reads[name], read_rate(where[name]))
                rates[name] = max(rates[name], rate(where[name])[0])
        for name in kinds:
            print(
                f"{name:8s} read {reads[name]:9.0f} rows/s ({reads[name] / reads['folder']:.2f}x folder)   "
                f"read+decode {rates[name]:7.1f} img/s ({rates[name] / rates['folder']:.2f}x folder)"
            )
        if server is not None:
            server.stop()
            return
        for shards in (4, 16, 64):
            d = tmp / f"wds{shards}"
            write_shards(folder, d, per_shard=-(-args.images // shards))
            print(f"peak RSS, plan + read {shards:3d} shards: {rss_child(str(d)):.0f} MiB")


if __name__ == "__main__":
    main()
