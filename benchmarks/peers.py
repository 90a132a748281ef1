"""mae-deploy beside what users would pick instead, on the same ViT-B/16 encoder workloads (issue #7).

Runs in one process, on the same weights and the same inputs:

- mae-deploy: PyTorch eager (the torch runner), ONNX Runtime fp32 and int8 (the bundle's graphs), and
  OpenVINO fp32 on the same encoder.onnx where the openvino package is installed;
- Hugging Face transformers ``ViTMAEModel``: the number of kept tokens comes from ``config.mask_ratio``
  (HF fixes it in the config, so it is set per workload here; an exported HF graph keeps one count);
- timm's ``VisionTransformer`` (ViT-B/16 layout): no masking, so all tokens only.

Workloads: batch sizes (default 1 and 8) x visible tokens (all 196, and 49 = mask ratio 0.75 where the
implementation supports it). Every implementation runs with the same pinned thread count. Timing: the
clock and statistics of ``mae_deploy.bench``; implementations are interleaved in rounds (each round
starts with one untimed call) so drift in machine load hits all of them alike, and ratios are measured
within one run. Each row also shows the largest difference of its output from mae-deploy's torch
output on the same input, so every implementation provably did the same work.

The weights are random (seeded): speed does not depend on their values, and nothing is downloaded.
The exported bundle is cached (``--bundle``) so a re-run skips the export.

    python benchmarks/peers.py                 # print the table (a few minutes on 2 cores)
    python benchmarks/peers.py --write         # also update README.md "## Performance" and
                                               # benchmarks/RESULTS.md "## Peers (issue #7)"
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae_deploy.bench import (  # noqa: E402
    CpuShare,
    agreement,
    default_threads,
    library_versions,
    load_average,
    machine_info,
    time_calls,
)
from mae_deploy.bench import latency_stats as _stats  # noqa: E402
from mae_deploy.fileio import atomic_write_text  # noqa: E402

README_SECTION = "## Performance"
RESULTS_SECTION = "## Peers (issue #7)"
TORCH_EAGER = "mae-deploy torch eager fp32"
_LABELS = {"mae_vit_base_patch16": "ViT-B/16", "mae_vit_large_patch16": "ViT-L/16", "mae_vit_huge_patch14": "ViT-H/14"}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mae-deploy" / "peers"


def get_bundle(model_name: str, path: Path, seed: int):
    """The cached bundle (fp32 + int8 encoder, reference weights), exported once from a seeded random model."""
    import torch

    from export.bundle_writer import export_bundle
    from mae_deploy.bundle import Bundle
    from mae_deploy.errors import BundleError
    from training.model import create_model

    try:
        b = Bundle.load(path, verify=False)
        if (
            b.name == model_name
            and b.has_decoder
            and "int8" in b.precisions("encoder")
            and (b.path / "reference").is_dir()
        ):
            return b
    except BundleError:
        pass
    print(f"exporting {model_name} (random weights, seed {seed}) to {path} ...", flush=True)
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Both parts: with parts="encoder", reference/ holds the decoder weights too and does not load back.
    export_bundle(
        model, path, precisions=("fp32", "int8"), reference_weights=True, verify=False, overwrite=True, progress=None
    )
    return Bundle.load(path, verify=False)


def hf_model(model, cfg):
    """transformers ViTMAEModel with the same weights, saved in HF layout and loaded back with from_pretrained."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from training.hf_layout import official_to_hf

    hf_cfg = transformers.ViTMAEConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias,
        layer_norm_eps=cfg.norm_eps,
        mask_ratio=0.0,
    )
    sd = {
        k[len("vit.") :]: v.contiguous() for k, v in official_to_hf(model.state_dict()).items() if k.startswith("vit.")
    }
    with tempfile.TemporaryDirectory() as d:
        hf_cfg.save_pretrained(d)
        save_file(sd, os.path.join(d, "model.safetensors"))
        m, info = transformers.ViTMAEModel.from_pretrained(d, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if "position" not in k]  # fixed sin-cos, recomputed by HF
    if missing or info["unexpected_keys"]:
        raise RuntimeError(
            f"HF ViTMAEModel did not take the weights: missing {missing}, unexpected {info['unexpected_keys']}"
        )
    with torch.no_grad():  # ours are the same sin-cos values; copy so both runs hold identical numbers
        m.embeddings.position_embeddings.copy_(model.pos_embed)
    return m.eval()


def timm_model(model, cfg):
    """timm VisionTransformer in the ViT-B/16 layout (vit_base_patch16_224 for ViT-B) with the same weights."""
    import timm.models.vision_transformer as tv
    import torch

    m = tv.VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        num_classes=0,
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps),
    )
    own = m.state_dict()
    sd = {k: v for k, v in model.state_dict().items() if k in own}
    result = m.load_state_dict(sd, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"timm ViT did not take the weights: missing {result.missing_keys}")
    return m.eval()


def build_implementations(bundle, threads: int) -> tuple[list[tuple[str, Callable, bool]], object]:
    """[(name, fn(pixels_np, noise_np, visible) -> latent np, supports_masking)], and the torch model."""
    import torch

    from mae_deploy.errors import DeviceUnavailable, MissingDependency
    from mae_deploy.runners import create_runner

    torch.set_num_threads(threads)
    eager = create_runner(bundle, "torch", "cpu", "fp32", threads=threads)
    ort32 = create_runner(bundle, "ort", "cpu", "fp32", intra_op_threads=threads, inter_op_threads=1).load(("encoder",))
    ort8 = create_runner(bundle, "ort", "cpu", "int8", intra_op_threads=threads, inter_op_threads=1).load(("encoder",))
    model, cfg = eager.model, eager.model.config
    hf = hf_model(model, cfg)
    vit = timm_model(model, cfg)
    L = cfg.num_patches

    def ids(noise: np.ndarray, k: int) -> np.ndarray:
        return np.ascontiguousarray(np.argsort(noise, axis=1, kind="stable")[:, :k], dtype=np.int64)

    def mae(runner):
        return lambda x, noise, k: runner.encode(x, ids(noise, k))

    def run_hf(x, noise, k):
        hf.config.mask_ratio = 1.0 - k / L  # HF reads it per call: len_keep = int(L * (1 - mask_ratio))
        with torch.inference_mode():
            out = hf(pixel_values=torch.from_numpy(x), noise=torch.from_numpy(noise)).last_hidden_state
        if out.shape[1] != k + 1:
            raise RuntimeError(f"HF kept {out.shape[1] - 1} tokens, expected {k}")
        return out.numpy()

    def run_timm(x, noise, k):
        with torch.inference_mode():
            return vit.forward_features(torch.from_numpy(x)).numpy()

    impls = [
        (TORCH_EAGER, mae(eager), True),
        ("mae-deploy ORT fp32", mae(ort32), True),
        ("mae-deploy ORT int8", mae(ort8), True),
        (f"HF transformers {library_versions(['transformers']).get('transformers', '')} ViTMAEModel", run_hf, True),
        (f"timm {library_versions(['timm']).get('timm', '')} ViT", run_timm, False),
    ]
    try:  # an optional engine: a row where it is installed, a note where not
        ov32 = create_runner(bundle, "openvino", "cpu", "fp32", threads=threads).load(("encoder",))
        impls.insert(3, ("mae-deploy OpenVINO fp32", mae(ov32), True))
    except (MissingDependency, DeviceUnavailable) as e:
        print(f"  (no OpenVINO row: {e})", flush=True)
    return impls, cfg


def run(args) -> dict:
    bundle = get_bundle(args.model, Path(args.bundle), args.seed)
    impls, cfg = build_implementations(bundle, args.threads)
    L = cfg.num_patches
    visibles = [L] + [k for k in (int(L * 0.25),) if k != L]
    load_start = load_average()
    cpu_share = CpuShare()
    t_start = time.perf_counter()
    rows = []
    per_round = max(1, math.ceil(args.iters / args.rounds))
    for b in args.batch_sizes:
        rng = np.random.default_rng([args.seed, b])
        x = rng.standard_normal((b, cfg.in_chans, cfg.img_size, cfg.img_size), np.float32)
        for k in visibles:
            # All tokens in order (noise = position) for K = L, so timm (no masking) sees the same tokens.
            noise = (
                np.broadcast_to(np.arange(L, dtype=np.float32), (b, L)).copy()
                if k == L
                else rng.random((b, L), dtype=np.float32)
            )
            active = [(n, fn) for n, fn, masks in impls if masks or k == L]
            outputs, samples = {}, {n: [] for n, _ in active}
            for n, fn in active:
                outputs[n] = fn(x, noise, k)
                for _ in range(args.warmup):
                    fn(x, noise, k)
            for _ in range(args.rounds):
                for n, fn in active:
                    fn(x, noise, k)  # untimed: lets the previous implementation's threads go idle
                    s, _ = time_calls(partial(fn, x, noise, k), 0, per_round, None)
                    samples[n] += s
            ref = outputs[TORCH_EAGER]
            base = _stats(samples[TORCH_EAGER])["p50"]
            for n, _ in active:
                st = _stats(samples[n])
                rows.append(
                    {
                        "implementation": n,
                        "batch": b,
                        "visible": k,
                        "iterations": len(samples[n]),
                        "p50_ms": st["p50"],
                        "mean_ms": st["mean"],
                        "images_per_s": b * 1000 / st["mean"],
                        "speedup_vs_torch_eager": base / st["p50"],
                        "max_abs_diff_vs_mae_deploy_torch": float(np.abs(outputs[n] - ref).max()),
                        "cosine_vs_mae_deploy_torch": agreement(outputs[n], ref, TORCH_EAGER)["cosine"],
                    }
                )
                print(f"  {n:<40} b{b:<3} k{k:<4} p50 {st['p50']:9.2f} ms", flush=True)
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.model,
        "threads": args.threads,
        "iters": per_round * args.rounds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": machine_info(["numpy", "onnxruntime", "torch", "transformers", "timm"]),
        "load_average": {"start": load_start, "end": load_average(), "other_cpu_share": cpu_share.others()},
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    la = res["load_average"]
    lines = [
        f"{_LABELS.get(res['model'], res['model'])} encoder (`{res['model']}`, random weights), CPU, "
        f"{res['threads']} threads pinned for every implementation. Measured {res['created']} on "
        f"{m['cpu_model']} ({' '.join(m['cpu_flags'])}; "
        f"{m['cores']} cores / {m['threads']} threads, {m['memory_gb']} GB); {libs}.",
        f"{res['iters']} timed calls per row in {res['rounds']} interleaved rounds after {res['warmup']} warm-up "
        f"calls; other processes used {100 * (la['other_cpu_share'] or 0):.0f} % of the CPU during the run"
        + (
            " (contended: absolute times are pessimistic, ratios less affected)."
            if (la["other_cpu_share"] or 0) > 0.05
            else "."
        ),
        "",
        "| implementation | batch | visible tokens | p50 ms | mean ms | images/s | speed-up vs torch eager (p50) "
        "| max abs diff vs mae-deploy torch | lowest cosine vs mae-deploy torch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['implementation']} | {r['batch']} | {r['visible']} | {r['p50_ms']:.1f} | {r['mean_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['speedup_vs_torch_eager']:.2f}x | "
            f"{r['max_abs_diff_vs_mae_deploy_torch']:.1e} | {r['cosine_vs_mae_deploy_torch']:.5f} |"
        )
    lines += [
        "",
        "HF's ViTMAEModel takes the kept-token count from `config.mask_ratio` (set per row here); timm's ViT "
        "has no masking, so it runs all tokens only. Regenerate with `python benchmarks/peers.py --write`; "
        "measure your own bundle with `mae-deploy bench`.",
    ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, header: str, body: str, before: str | None = None) -> str:
    """Replace the body of ``header`` (up to the next header of the same level), or insert the section
    before the ``before`` header (else at the end)."""
    level = header.split(" ", 1)[0] + " "
    block = f"{header}\n\n{body.rstrip()}\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == header), None)
    if start is not None:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(level)), len(lines))
        return "".join(lines[:start]) + block + "".join(lines[end:])
    at = next((i for i, line in enumerate(lines) if before and line.rstrip() == before), None)
    if at is None:
        return text.rstrip() + "\n\n" + block.rstrip() + "\n"
    return "".join(lines[:at]) + block + "".join(lines[at:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16", help="registry name (default: ViT-B/16)")
    p.add_argument("--batch-sizes", default="1,8", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--iters", type=int, default=8, help="timed calls per row (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds the calls are split into")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", default=None, help="where the exported bundle is cached")
    p.add_argument("--write", action="store_true", help="update README.md and benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = default_threads()
    args.bundle = args.bundle or str(_cache_dir() / args.model)
    res = run(args)
    table = markdown(res)
    print()
    print(table)
    print(f"({res['seconds']:.0f} s of measurement)")
    if args.write:
        readme = ROOT / "README.md"
        atomic_write_text(readme, replace_section(readme.read_text(), README_SECTION, table, before="## Layout"))
        results = ROOT / "benchmarks" / "RESULTS.md"
        old = results.read_text() if results.exists() else "# Benchmark results\n"
        atomic_write_text(results, replace_section(old, RESULTS_SECTION, table))
        print(f"wrote {readme} and {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
