"""`make demo`: the whole mae-deploy job on real data, in a few minutes on a laptop CPU.

    scripts/demo.py [--out demo_out] [--fresh] [--pretrain-epochs 80] [--probe-epochs 20]

1. data        scikit-learn's 1797 handwritten digits as an ImageFolder   (mae-deploy data digits)
2. pretrain    a small MAE (mae_vit_tiny_patch4, greyscale, norm-pix loss) (mae-deploy pretrain)
3. linprobe    the official linear probe (frozen encoder, BatchNorm + linear, LARS) on the pretrained
               encoder and, with the same recipe, on the same encoder at random init (mae-deploy linprobe)
4. export      ONNX bundle verified against PyTorch                         (mae-deploy export)
   classifier  the linear-probe classifier exported (fp32 + int8) and scored on the labelled val split;
               int8 top-1 within 0.5 points of fp32 or the demo stops   (mae-deploy export, eval)
5. reconstruct masked digits reconstructed to PNG                           (mae-deploy reconstruct)
6. extract     features of every image                                      (mae-deploy extract)
   sources     the same digits as WebDataset shards and as Parquet, same features (data --format, extract)
7. bench       latency per backend, batch size and visible tokens           (mae-deploy bench)
8. serve       the bundle behind HTTP: a few requests, then SIGTERM         (mae-deploy serve)

Every stage runs the public command line. A stage whose command this installation lacks is skipped and
the summary says so. Finished stages are reused when the demo runs again (an interrupted pretraining
resumes from its last checkpoint); --fresh starts over. Outputs and a summary.json go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "mae_vit_tiny_patch4"  # 32 px, patch 4 (64 patches), width 128, depth 4, decoder 64 x 2
STATE = "demo_state.json"


def available_commands() -> set[str]:
    """Commands of this installation's `mae-deploy` (the CLI registers them without importing torch)."""
    from mae_deploy.cli import main

    return set(main.commands)


def mae_deploy(*args: str) -> None:
    """Run `mae-deploy ARGS...` with this interpreter; stop the demo when it fails."""
    cmd = [sys.executable, "-m", "mae_deploy.cli", *args]
    print(f"\n$ mae-deploy {' '.join(args)}", flush=True)
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(
            f"demo: `mae-deploy {args[0]}` failed with exit code {r.returncode}; "
            "fix the cause and run the demo again (finished stages are kept)"
        )


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def last_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


class Demo:
    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.args = out, args
        self.state_path = out / STATE
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.commands = available_commands()

    def stage(self, name: str, needs: str | None, run, outputs: list[Path]) -> dict | None:
        """Run one stage unless it finished before (state + outputs present) or its command is missing."""
        done = self.state.get(name)
        if done and done.get("status") == "ran" and all(p.exists() for p in outputs):
            print(f"\n== {name}: reused from an earlier run ({done['seconds']:.0f}s then)")
            done["reused"] = True
            return done
        if needs and needs not in self.commands:
            print(f"\n== {name}: skipped (this installation has no `mae-deploy {needs}` command)")
            self.state[name] = {"status": "skipped", "reason": f"no `mae-deploy {needs}` command", "seconds": 0.0}
            return None
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        result = run() or {}
        self.state[name] = {"status": "ran", "seconds": time.perf_counter() - t0, **result}
        write_json(self.state_path, self.state)
        return self.state[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", type=Path, help="output directory (default: demo_out)")
    ap.add_argument("--fresh", action="store_true", help="delete earlier demo outputs and start over")
    ap.add_argument("--pretrain-epochs", type=int, default=80, help="MAE pretraining epochs (default 80)")
    ap.add_argument("--probe-epochs", type=int, default=20, help="linear probe epochs (default 20)")
    args = ap.parse_args()
    out = args.out.resolve()
    if args.fresh and out.exists():
        if any(out.iterdir()) and not (out / STATE).exists():
            raise SystemExit(f"demo: {out} is not a demo output directory (no {STATE}); not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    demo = Demo(out, args)
    digits, pre, bundle = out / "digits", out / "pretrain", out / "bundle"
    probe = {"pretrained": out / "linprobe_pretrained", "random": out / "linprobe_random"}
    common = ["--input_size", "32", "--num_workers", "0", "--device", "cpu", "--resume", "auto", "--save_freq", "1000"]

    # 1. Real data: 8x8 digit scans upscaled to 32x32 PNGs, 80/20 stratified split.
    def data() -> dict:
        mae_deploy("data", "digits", str(digits))
        return {k: v for k, v in json.loads((digits / "digits.json").read_text()).items() if k in ("train", "val")}

    demo.stage("data", "data", data, [digits / "digits.json"])

    # 2. MAE pretraining: official recipe, small model, norm-pix loss.
    def pretrain() -> dict:
        mae_deploy(
            "pretrain",
            "--model",
            MODEL,
            "--in_chans",
            "1",
            "--norm_pix_loss",
            "--mask_ratio",
            "0.75",
            "--batch_size",
            "64",
            "--epochs",
            str(args.pretrain_epochs),
            "--warmup_epochs",
            "5",
            "--blr",
            "2e-3",
            "--data_path",
            str(digits),
            "--output_dir",
            str(pre),
            *common,
        )
        m = last_metrics(pre)
        return {"first_loss": m[0]["train_loss"], "last_loss": m[-1]["train_loss"], "epochs": len(m)}

    demo.stage("pretrain", "pretrain", pretrain, [pre / "model" / "config.json"])

    # 3. Linear probe, same recipe and seed: pretrained encoder vs the same encoder at random init.
    def linprobe(kind: str):
        def run() -> dict:
            source = (
                ["--finetune", str(pre / "model")] if kind == "pretrained" else ["--model", MODEL, "--in_chans", "1"]
            )
            mae_deploy(
                "linprobe",
                *source,
                "--batch_size",
                "128",
                "--epochs",
                str(args.probe_epochs),
                "--warmup_epochs",
                "2",
                "--blr",
                "20",
                "--data_path",
                str(digits),
                "--output_dir",
                str(probe[kind]),
                *common,
            )
            m = last_metrics(probe[kind])
            return {"acc1": m[-1]["test_acc1"], "acc5": m[-1]["test_acc5"], "best_acc1": m[-1]["best_acc1"]}

        return run

    for kind in ("pretrained", "random"):
        demo.stage(f"linprobe_{kind}", "linprobe", linprobe(kind), [probe[kind] / "model" / "config.json"])

    # 4. Export: encoder + decoder graphs with symbolic batch / visible tokens, parity-checked.
    def export() -> dict:
        mae_deploy("export", str(pre / "model"), "--out", str(bundle), "--reference-weights", "--overwrite")
        manifest = json.loads((bundle / "mae.json").read_text())
        diffs = [g.get("parity", {}).get("max_abs_diff") for g in manifest["graphs"]]
        return {
            "graphs": [g["file"] for g in manifest["graphs"]],
            "max_abs_diff": max((d for d in diffs if d is not None), default=None),
        }

    exported = demo.stage("export", "export", export, [bundle / "mae.json"])

    # 4b. The linear-probe classifier as a deployable graph, scored per precision on the labelled val split.
    cls_bundle, eval_json = out / "classifier_bundle", out / "eval.json"

    def export_classifier() -> dict:
        mae_deploy(
            "export",
            str(probe["pretrained"] / "model"),
            "--out",
            str(cls_bundle),
            "--precision",
            "fp32,int8",
            # int8 verified on real digits: on noise images a trained classifier's top-1 turns on rounding
            "--calibration",
            str(digits / "train"),
            "--reference-weights",
            "--overwrite",
        )
        return {"graphs": [g["file"] for g in json.loads((cls_bundle / "mae.json").read_text())["graphs"]]}

    def evaluate() -> dict:
        mae_deploy(
            "eval",
            str(cls_bundle),
            str(digits / "val"),
            "--precisions",
            "fp32,int8",
            "--out",
            str(eval_json),
            "--plot",
            str(out / "eval_confusion.png"),
            "--max-top1-drop",
            "0.5",
            "--no-progress",
        )
        doc = json.loads(eval_json.read_text())
        return {"images": doc["images"], "rows": [{k: r[k] for k in ("name", "top1", "top5")} for r in doc["results"]]}

    if demo.stage("export_classifier", "eval", export_classifier, [cls_bundle / "mae.json"]):
        demo.stage("eval", "eval", evaluate, [eval_json])

    # 5-7 need the bundle.
    if exported:
        recon = out / "reconstructions"

        def reconstruct() -> dict:
            samples = [sorted((digits / "val" / str(d)).glob("*.png"))[0] for d in range(10)]
            mae_deploy(
                "reconstruct",
                *map(str, samples),
                "--bundle",
                str(bundle),
                "--out",
                str(recon),
                "--mask-ratio",
                "0.75",
                "--seed",
                "0",
            )
            return {"images": len(list(recon.glob("*.png")))}

        demo.stage("reconstruct", "reconstruct", reconstruct, [recon])

        feats = out / "features"

        def extract() -> dict:
            mae_deploy(
                "extract",
                str(digits),
                "--bundle",
                str(bundle),
                "--out",
                str(feats),
                "--pool",
                "cls",
                "--workers",
                "1",
                "--no-progress",
            )
            manifest = json.loads((feats / "manifest.json").read_text())
            counts = manifest.get("counts", {})
            return {
                "features": counts.get("features"),
                "failed": counts.get("failed"),
                "feature_shape": manifest.get("feature_shape"),
            }

        demo.stage("extract", "extract", extract, [feats / "manifest.json"])

        def sources() -> dict:
            """The same digits as WebDataset shards and as Parquet: the same features as from the folder."""
            import numpy as np

            from mae_deploy import open_features

            folder = np.asarray(open_features(feats))
            result = {}
            for fmt in ("webdataset", "parquet"):
                src, dst = out / f"digits-{fmt}", out / f"features-{fmt}"
                mae_deploy("data", "digits", str(src), "--format", fmt)
                mae_deploy(
                    "extract",
                    str(src),
                    "--bundle",
                    str(bundle),
                    "--out",
                    str(dst),
                    "--pool",
                    "cls",
                    "--workers",
                    "1",
                    "--no-progress",
                )
                got = open_features(dst)
                result[fmt] = {
                    "features": len(got),
                    "first_path": got.paths[0],
                    "max_abs_diff_vs_folder": float(np.abs(np.asarray(got) - folder).max()),
                }
            return result

        demo.stage("sources", "extract", sources, [out / "features-parquet" / "manifest.json"])

        bench_dir = out / "bench"

        def bench() -> dict:
            bench_dir.mkdir(exist_ok=True)
            mae_deploy(
                "bench",
                str(bundle),
                "--backends",
                "ort,openvino,torch",
                "--parts",
                "encoder,reconstruct",
                "--batch-sizes",
                "1,64",
                "--out",
                str(bench_dir / "results.json"),
                "--markdown",
                str(bench_dir / "results.md"),
            )
            rows = json.loads((bench_dir / "results.json").read_text()).get("rows", [])
            return {
                "rows": [
                    {k: r.get(k) for k in ("backend", "part", "batch", "visible", "status", "throughput_ips")}
                    | {"p50_ms": (r.get("latency_ms") or {}).get("p50")}
                    for r in rows
                ]
            }

        demo.stage("bench", "bench", bench, [bench_dir / "results.json"])

        samples = [sorted((digits / "val" / str(d)).glob("*.png"))[0] for d in range(3)]
        demo.stage("serve", "serve", lambda: serve_demo(bundle, samples, out / "serve"), [out / "serve"])
    else:
        for name in ("reconstruct", "extract", "sources", "bench", "serve"):
            demo.state[name] = {"status": "skipped", "reason": "no bundle (export did not run)", "seconds": 0.0}

    write_json(demo.state_path, demo.state)
    summarize(demo, out, time.perf_counter() - t_start)


def serve_demo(bundle: Path, images: list[Path], out: Path) -> dict:
    """Start `mae-deploy serve` on a free port, send a few requests, print the answers, stop it (SIGTERM)."""
    import signal
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n$ mae-deploy serve {bundle} --port {port}", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mae_deploy.cli", "serve", str(bundle), "--port", str(port)],
        cwd=ROOT,
        stderr=open(out / "server.log", "w"),
    )  # noqa: SIM115 (the child owns it)

    def call(path: str, data: bytes | None = None, ctype: str = "image/png") -> tuple[int, bytes]:
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": ctype} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        for _ in range(600):  # up to 60 s for the model to load
            try:
                if call("/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        status, body = call("/readyz")
        print(f"GET /readyz -> {status} {body.decode()}")
        answered = 1
        for img in images:
            status, body = call("/v1/features?pool=cls", img.read_bytes())
            doc = json.loads(body)
            emb = doc["data"][0]["embedding"]
            print(
                f"POST /v1/features {img.name} -> {status}: dim {doc['dim']}, first values "
                f"{', '.join(f'{v:+.3f}' for v in emb[:4])} ..."
            )
            answered += 1
        status, png = call("/v1/reconstruct?mask_ratio=0.75&seed=0", images[0].read_bytes())
        (out / "reconstruct.png").write_bytes(png)
        print(f"POST /v1/reconstruct -> {status}: {len(png)} bytes of PNG -> {out / 'reconstruct.png'}")
        status, body = call("/v1/features", b"not an image")
        print(f"POST /v1/features (not an image) -> {status} {body.decode()}")
        answered += 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    print(f"SIGTERM -> the server drained and exited {code}")
    return {"requests": answered, "exit_code": code}


def summarize(demo: Demo, out: Path, elapsed: float) -> None:
    s = demo.state
    lines = ["", "=" * 78, "mae-deploy demo: summary", "=" * 78]
    for name, st in s.items():
        how = "reused" if st.get("reused") else st["status"]
        lines.append(f"  {name:<20} {how:<8} {st['seconds']:6.1f}s" + (f"  ({st['reason']})" if "reason" in st else ""))
    d = s.get("data", {})
    if d.get("status") == "ran":
        lines.append(f"\ndata        {d['train']} train + {d['val']} val real handwritten digits   {out / 'digits'}")
    p = s.get("pretrain", {})
    if p.get("status") == "ran":
        lines.append(
            f"pretrain    {MODEL}, {p['epochs']} epochs, masked-patch loss {p['first_loss']:.3f} -> "
            f"{p['last_loss']:.3f}   {out / 'pretrain' / 'model'}"
        )
    a, b = s.get("linprobe_pretrained", {}), s.get("linprobe_random", {})
    if a.get("status") == "ran" and b.get("status") == "ran":
        lines.append(
            f"linprobe    top-1 on val: pretrained {a['acc1']:.1f}%  vs  random init {b['acc1']:.1f}%  "
            f"({a['acc1'] - b['acc1']:+.1f} points; same recipe, seed and budget)"
        )
        lines.append(f"            {out / 'linprobe_pretrained'}   {out / 'linprobe_random'}")
    e = s.get("export", {})
    if e.get("status") == "ran":
        diff = f", max |diff| vs PyTorch {e['max_abs_diff']:.1e}" if e.get("max_abs_diff") is not None else ""
        lines.append(f"export      {', '.join(e['graphs'])}{diff}   {out / 'bundle'}")
    ev = s.get("eval", {})
    if ev.get("status") == "ran":
        lines.append(f"eval        linear-probe classifier on {ev['images']} val digits   {out / 'eval.json'}")
        lines += [
            f"            {row['name']:<11} top-1 {row['top1']:6.2f} %  top-5 {row['top5']:6.2f} %"
            for row in ev["rows"]
        ]
    r = s.get("reconstruct", {})
    if r.get("status") == "ran":
        lines.append(f"reconstruct {r['images']} digits, 75% of patches masked   {out / 'reconstructions'}")
    x = s.get("extract", {})
    if x.get("status") == "ran":
        lines.append(
            f"extract     {x.get('features')} images -> features of shape {x.get('feature_shape')} "
            f"({x.get('failed')} failed)   {out / 'features'}"
        )
    src = s.get("sources", {})
    if src.get("status") == "ran":
        for fmt in ("webdataset", "parquet"):
            lines.append(
                f"sources     {fmt:<10} {src[fmt]['features']} features, max |diff| to the folder's "
                f"{src[fmt]['max_abs_diff_vs_folder']:.1e}   {out / ('features-' + fmt)}"
            )
    bn = s.get("bench", {})
    if bn.get("status") == "ran":
        lines.append(
            f"bench       {len(bn['rows'])} rows (ONNX Runtime and OpenVINO below)   {out / 'bench' / 'results.md'}"
        )
        for row in bn["rows"]:
            if row.get("p50_ms") is not None and row["backend"] in ("ort", "openvino"):
                lines.append(
                    f"            {row['backend']:<8} {row['part']:<12} batch {row['batch']:<3} "
                    f"visible {row['visible']:<3} "
                    f"p50 {row['p50_ms']:7.2f} ms  {row.get('throughput_ips') or 0:8.0f} images/s"
                )
    sv = s.get("serve", {})
    if sv.get("status") == "ran":
        lines.append(
            f"serve       {sv['requests']} HTTP requests answered; SIGTERM -> exit {sv['exit_code']}   {out / 'serve'}"
        )
    lines.append(f"\ntotal {elapsed:.0f}s this run; state in {out / STATE}")
    print("\n".join(lines))
    write_json(out / "summary.json", {"elapsed_s": elapsed, "stages": s})


if __name__ == "__main__":
    main()
