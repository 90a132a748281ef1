"""Read every MAE checkpoint a user has; write the native format.

Formats, detected automatically:

- ``native``: a directory with ``config.json`` (``"format": "mae-deploy-checkpoint"``) and
  ``model.safetensors``.
- ``official``: ``.pth`` files of the official MAE code, ``{'model': state_dict, ...}``: encoder-only
  ``mae_pretrain_vit_*``, ``*_full`` (decoder, norm-pix targets), ``mae_visualize_*`` (raw-pixel targets),
  fine-tuned (``fc_norm`` + ``head``), and full training checkpoints (optimizer, scaler, args).
- ``hf``: Hugging Face ViTMAE directories (``config.json`` with ``model_type: vit_mae`` +
  ``model.safetensors`` or ``pytorch_model.bin``); q/k/v are fused into ``qkv``; ``layer_norm_eps`` kept.
- ``timm``: timm ViT/MAE state dicts (bare dicts or ``.safetensors``) — the official key layout without
  the ``{'model': ...}`` wrapper.

Pickles are read with ``torch.load(weights_only=True)``: a file that would import or run code is refused
and nothing in it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mae_deploy.config_check import check_architecture
from mae_deploy.errors import CheckpointError
from mae_deploy.fileio import atomic_write, atomic_write_json, check_writable
from training.architecture import hints_from_args, infer_config, shorten_keys
from training.hf_layout import hf_to_official
from training.model import MAEConfig, MaskedAutoencoderViT, VisionTransformer

NATIVE_FORMAT = "mae-deploy-checkpoint"
NATIVE_VERSION = 1


@dataclass
class LoadedCheckpoint:
    """A checkpoint in the official key layout, with the architecture it needs."""

    config: MAEConfig
    state_dict: dict[str, torch.Tensor]
    parts: list[str]  # subset of ["encoder", "decoder", "head"]
    format: str  # "native" | "official" | "hf" | "timm"
    source: str
    notes: list[str] = field(default_factory=list)
    num_classes: int = 0
    global_pool: bool = False
    nonfinite: list[str] = field(default_factory=list)  # tensors holding NaN or inf
    class_names: list[str] = field(default_factory=list)  # ImageFolder classes of a finetune/linprobe run

    @property
    def is_classifier(self) -> bool:
        return "head" in self.parts

    def nonfinite_message(self) -> str:
        return (
            f"{self.source} is damaged: {len(self.nonfinite)} tensor(s) hold NaN or inf values "
            f"({shorten_keys(self.nonfinite)}); re-download it, or resume from an earlier training checkpoint"
        )

    def require_finite(self) -> None:
        """Raise CheckpointError naming the tensors with NaN/inf: such weights give NaN everywhere."""
        if self.nonfinite:
            raise CheckpointError(self.nonfinite_message())

    def parameter_counts(self) -> dict[str, int]:
        counts = {"encoder": 0, "decoder": 0, "head": 0}
        for k, v in self.state_dict.items():
            if k in ("pos_embed", "decoder_pos_embed"):
                continue  # fixed sin-cos buffers, not learned in pretraining
            counts[_part_of(k)] += v.numel()
        return {k: v for k, v in counts.items() if v}


def _part_of(key: str) -> str:
    if key.startswith(("decoder", "mask_token")):
        return "decoder"
    if key.startswith(("head", "fc_norm")):
        return "head"
    return "encoder"


# --------------------------------------------------------------------------------------------------
# Reading raw files
# --------------------------------------------------------------------------------------------------


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """Raise CheckpointError unless ``path`` is a non-empty regular file (never block on a FIFO or read
    /dev/zero forever); returns it as a Path."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {p} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} {p} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {p} is not a regular file (a pipe, device or socket); give the file itself")
    if st.st_size == 0:
        raise CheckpointError(f"{what} {p} is empty (0 bytes): the download or copy did not finish; fetch it again")
    return p


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _torch_load(path: Path) -> object:
    check_checkpoint_file(path)
    try:
        # argparse.Namespace holds the training args in official training checkpoints: plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                # Tensors backed by the file's pages (copy-on-write), not a heap copy: load_model hands them
                # to the model itself, so a ViT-H .pth costs one copy of its weights, not two.
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # only the legacy (pre-zip) format refuses mmap: read it whole
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # "Unsupported global" = the pickle asks for code; any other unpickler error = damaged bytes.
        if "Unsupported global" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it asks for {found.group(1)})" if found else ""
            raise CheckpointError(
                f"refused to load {path}: the pickle references code that loading would run{what}. "
                "Only tensors and plain containers are loaded (torch.load weights_only=True). If you trust "
                "the file, re-save its state_dict with torch.save(sd, ...) and convert that."
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        reason = detail.group(1).strip() if detail else _first_line(e)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({reason}); is it truncated or corrupt? Re-download it."
        ) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError for damaged zips
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint: {type(e).__name__}: {_first_line(e)}. "
            "The file may be truncated (re-download it) or not a checkpoint at all."
        ) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_checkpoint_file(path, "weights file")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(
            f"could not read {path} as safetensors: {_first_line(e)}; the file may be truncated"
        ) from None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header alone (8-byte length + JSON), no tensor read."""
    p = check_checkpoint_file(path, "weights file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise CheckpointError(
            f"could not read {p} as safetensors: {_first_line(e)}; the file may be truncated"
        ) from None


def _read_json(path: Path) -> dict:
    check_checkpoint_file(path, "config file")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def detect_format(path: str | os.PathLike) -> str:
    """'native' | 'hf' | 'timm' | 'official' for a directory or file, or a CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(
                f"{p} is a directory without config.json: expected a native checkpoint or a Hugging Face "
                "ViTMAE directory"
            )
        cfg = _read_json(cfg_path)
        if cfg.get("format") == NATIVE_FORMAT:
            return "native"
        if cfg.get("model_type") in ("vit_mae", "vit"):
            return "hf"
        if "architecture" in cfg or "pretrained_cfg" in cfg:
            return "timm"
        raise CheckpointError(f"{cfg_path} is neither a mae-deploy, Hugging Face ViTMAE nor timm config")
    if p.suffix == ".safetensors":
        return "timm"
    return "official"  # refined to 'timm' / 'hf' by the key layout once loaded


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP wraps the model as `module.`; torch.compile as `_orig_mod.`.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, **hints) -> LoadedCheckpoint:
    """Read any supported checkpoint into the official key layout plus its architecture.

    ``hints`` override what the weights cannot tell: ``num_heads``, ``decoder_num_heads``,
    ``norm_pix_loss``, ``model`` (registry name).
    """
    p = Path(path)
    fmt = detect_format(p)
    notes: list[str] = []
    hints = {k: v for k, v in hints.items() if v is not None}

    if fmt == "native":
        loaded = _load_native(p, notes)
        _check_keys(loaded)
        return _finish(loaded)

    if fmt == "hf":
        hf_cfg = _read_json(p / "config.json")
        if (p / "model.safetensors").exists():
            raw = _load_safetensors(p / "model.safetensors")
        elif (p / "pytorch_model.bin").exists():
            raw = _torch_load(p / "pytorch_model.bin")
        else:
            raise CheckpointError(f"{p} has a Hugging Face config but no model.safetensors or pytorch_model.bin")
        sd = hf_to_official(raw)
        if hf_cfg.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"hidden_act={hf_cfg['hidden_act']} is not supported (MAE uses exact GELU)")
        hints = {
            "num_heads": hf_cfg.get("num_attention_heads"),
            "decoder_num_heads": hf_cfg.get("decoder_num_attention_heads"),
            "norm_pix_loss": hf_cfg.get("norm_pix_loss", False),
            "norm_eps": hf_cfg.get("layer_norm_eps", 1e-12),
            **hints,
        }
        if "pos_embed" not in sd and "image_size" in hf_cfg:
            raise CheckpointError(f"{p}: position embeddings missing from the weights")
        cfg, ncls, gpool = infer_config(sd, hints, notes)
        if "decoder_embed.weight" in sd and hf_cfg.get("decoder_intermediate_size") not in (
            None,
            int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        ):
            raise CheckpointError(
                "decoder_intermediate_size / decoder_hidden_size differs from the encoder's "
                "mlp ratio; mae-deploy uses one mlp_ratio for both"
            )
        loaded = LoadedCheckpoint(cfg, sd, _parts(sd), fmt, str(p), notes, ncls, gpool)
        _check_keys(loaded)
        return _finish(loaded)

    # A single file: official .pth, timm state dict (.pth/.bin/.safetensors).
    if p.suffix == ".safetensors":
        obj: object = _load_safetensors(p)
    else:
        obj = _torch_load(p)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict or {{'model': ...}}")
    if "model" in obj and isinstance(obj["model"], dict):
        sd, fmt = obj["model"], "official"
        hints = {**hints_from_args(obj.get("args")), **hints}
        if "optimizer" in obj:
            notes.append(f"training checkpoint (epoch {obj.get('epoch', '?')}): optimizer state ignored")
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, fmt = obj["state_dict"], "timm"
    else:
        sd, fmt = obj, "timm"
    sd = _strip_prefixes({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    if any(k.startswith(("vit.embeddings", "embeddings.patch_embeddings")) for k in sd):
        sd, fmt = hf_to_official(sd), "hf"
    name = p.name.lower()
    if "norm_pix_loss" not in hints and "decoder_embed.weight" in sd:
        if "visualize" in name:
            hints["norm_pix_loss"] = False
        elif "_full" in name:
            hints["norm_pix_loss"] = True
    cfg, ncls, gpool = infer_config(sd, hints, notes)
    loaded = LoadedCheckpoint(cfg, sd, _parts(sd), fmt, str(p), notes, ncls, gpool)
    _check_keys(loaded)
    return _finish(loaded)


def _finish(ckpt: LoadedCheckpoint) -> LoadedCheckpoint:
    """Record the tensors holding NaN/inf (``info`` reports them; loading a model refuses them)."""
    ckpt.nonfinite = sorted(
        k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    return ckpt


def _load_native(p: Path, notes: list[str]) -> LoadedCheckpoint:
    """config.json checked field by field, and against the weights' shapes (safetensors header) before
    anything is allocated: a config asking for depth 1e9 fails here instead of eating the memory."""
    cfg_path = p / "config.json"
    where = str(cfg_path)
    meta = _read_json(cfg_path)
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > NATIVE_VERSION:
        raise CheckpointError(
            f"{p} has native format version {version}; this mae-deploy reads up to {NATIVE_VERSION}: upgrade mae-deploy"
        )
    if "architecture" not in meta:
        raise CheckpointError(f"{where} lacks 'architecture'; re-convert the checkpoint with `mae-deploy convert`")
    arch = check_architecture(meta["architecture"], where, CheckpointError)
    parts = meta.get("parts", [])
    if not isinstance(parts, list) or not set(parts) <= {"encoder", "decoder", "head"}:
        raise CheckpointError(f"{where}: parts must be a list of encoder, decoder, head; got {parts!r}")
    head = meta.get("head", {})
    if not isinstance(head, dict):
        raise CheckpointError(f"{where}: head must be a JSON object, got {head!r}")
    head = check_architecture(
        {**arch, **{k: head[k] for k in ("num_classes", "global_pool") if k in head}},
        f"{where} (head)",
        CheckpointError,
    )
    try:
        cfg = MAEConfig.from_dict(arch)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    weights = p / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{p} has config.json but no model.safetensors")
    num_classes = int(head.get("num_classes", 0))
    parts = parts or _parts(safetensors_shapes(weights))
    _check_header_shapes(safetensors_shapes(weights), cfg, parts, num_classes, where)
    sd = _load_safetensors(weights)
    names = meta.get("head", {}).get("class_names") or []
    if not isinstance(names, list) or len(names) not in (0, num_classes) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: head.class_names must be a list of {num_classes} strings")
    return LoadedCheckpoint(
        cfg,
        sd,
        list(parts),
        "native",
        str(p),
        notes,
        num_classes,
        bool(head.get("global_pool", False)),
        class_names=list(names),
    )


def _check_header_shapes(
    shapes: dict[str, tuple[int, ...]], cfg: MAEConfig, parts: list[str], num_classes: int, where: str
) -> None:
    """The shapes that size the model (widths, depths, grid, head) agree with config.json."""
    d, p, c, n = cfg.embed_dim, cfg.patch_size, cfg.in_chans, 1 + cfg.num_patches
    expected = {
        "patch_embed.proj.weight": (d, c, p, p),
        "pos_embed": (1, n, d),
        "blocks.0.attn.qkv.weight": (3 * d, d),
        "blocks.0.mlp.fc1.weight": (int(d * cfg.mlp_ratio), d),
    }
    depths = {"blocks": ("depth", cfg.depth)}
    if "head" in parts:
        expected["head.weight"] = (num_classes, d)
    elif "decoder" in parts:
        dd = cfg.decoder_embed_dim
        expected.update(
            {"decoder_embed.weight": (dd, d), "decoder_pos_embed": (1, n, dd), "decoder_pred.weight": (p * p * c, dd)}
        )
        depths["decoder_blocks"] = ("decoder_depth", cfg.decoder_depth)
    problems = []
    for prefix, (field_name, want) in depths.items():
        have = len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})
        if have != want:
            problems.append(f"{field_name} is {want} but the weights hold {have} blocks")
    problems += [
        f"{k} is {shapes[k] if k in shapes else 'missing'}, config.json implies {v}"
        for k, v in expected.items()
        if shapes.get(k) != v
    ]
    if problems:
        raise CheckpointError(
            f"{where} does not match the weights in model.safetensors: {'; '.join(problems[:4])}. "
            "Re-convert the checkpoint (mae-deploy convert) rather than editing config.json"
        )


def _parts(sd: dict) -> list[str]:
    parts = ["encoder"]
    if "decoder_embed.weight" in sd:
        parts.append("decoder")
    if "head.weight" in sd:
        parts.append("head")
    return parts


def build_model(ckpt: LoadedCheckpoint) -> MaskedAutoencoderViT | VisionTransformer:
    """An empty model of the checkpoint's architecture (MAE, or classifier when it has a head)."""
    if ckpt.is_classifier:
        return VisionTransformer(replace(ckpt.config, decoder_depth=0), ckpt.num_classes, ckpt.global_pool)
    cfg = ckpt.config if "decoder" in ckpt.parts else replace(ckpt.config, decoder_depth=0)
    return MaskedAutoencoderViT(cfg)


def _model_without_weights(ckpt: LoadedCheckpoint) -> MaskedAutoencoderViT | VisionTransformer:
    """:func:`build_model` with every parameter on the meta device (shapes, no storage).

    Each parameter is moved to meta as its module registers it, so at most one layer's worth of memory is
    ever allocated. (A ``torch.device("meta")`` context cannot build the model: its constructor reads a
    linspace back with ``tolist()``.)
    """
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def on_meta(module, name, param):
        return None if param is None else torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        return build_model(ckpt)
    finally:
        handle.remove()


def _check_keys(ckpt: LoadedCheckpoint) -> None:
    expected = _model_without_weights(ckpt).state_dict()  # names and shapes only
    if not ckpt.parts:
        ckpt.parts = _parts(ckpt.state_dict)
    missing = [k for k in expected if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in ckpt.state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {shorten_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {shorten_keys(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {shorten_keys(wrong, 4)}")
    if problems:
        raise CheckpointError(
            f"{ckpt.source} ({ckpt.format}) does not match the architecture read from it "
            f"({ckpt.config.name}, dim {ckpt.config.embed_dim}, depth {ckpt.config.depth}): " + "; ".join(problems)
        )
    if "decoder" not in ckpt.parts and not ckpt.is_classifier:
        ckpt.notes.append(
            "encoder-only checkpoint: feature extraction works; reconstruction needs a decoder "
            "(use a *_full or *_visualize checkpoint)"
        )


def load_model(path: str | os.PathLike, **hints) -> tuple[MaskedAutoencoderViT | VisionTransformer, LoadedCheckpoint]:
    """Model with the checkpoint's weights, in eval mode."""
    ckpt = load_checkpoint(path, **hints)
    ckpt.require_finite()
    # The model takes the loaded tensors themselves (assign=True) into parameters made without storage
    # (meta): the returned checkpoint and the model share one copy of the weights (float32 ones are not
    # copied by .float()), where a built model plus load_state_dict's copy held two for as long as both lived.
    model = _model_without_weights(ckpt)
    model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=True, assign=True)
    return model.eval(), ckpt


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def save_native(
    model: MaskedAutoencoderViT | VisionTransformer,
    dst: str | os.PathLike,
    parts: list[str] | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    class_names: list[str] | None = None,
) -> Path:
    """Write config.json + model.safetensors into ``dst`` atomically (temp dir, then rename).

    ``class_names`` (a classifier's, index order) go to ``head.class_names``; export copies them to mae.json.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if parts is not None and "decoder" not in parts:
        # The parts written are the parts recorded: an encoder-only reference of a full MAE must load as one.
        sd = {k: v for k, v in sd.items() if _part_of(k) != "decoder"}
    is_cls = isinstance(model, VisionTransformer)
    meta = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "architecture": model.config.to_dict(),
        "parts": parts or _parts(sd),
        "source": source or {},
    }
    if is_cls:
        meta["head"] = {"num_classes": model.num_classes, "global_pool": model.global_pool}
        if class_names and len(class_names) == model.num_classes:
            meta["head"]["class_names"] = [str(n) for n in class_names]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary directory
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors creates it 0600
        atomic_write_json(tmp / "config.json", meta)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def save_official(model: torch.nn.Module, dst: str | os.PathLike) -> Path:
    """Write ``{'model': state_dict}`` as the official code does (atomic)."""
    state = {"model": model.state_dict()}
    return atomic_write(dst, lambda f: torch.save(state, f))


def convert(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False, **hints) -> LoadedCheckpoint:
    """Any supported checkpoint -> native directory; returns what was read.

    DST is checked first (exists without ``overwrite``, or not writable), before the source is read.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    check_writable(dst, what="destination", directory=True)
    model, ckpt = load_model(src, **hints)
    source = {"format": ckpt.format, "path": str(Path(src).resolve()), "notes": ckpt.notes}
    save_native(model, dst, parts=ckpt.parts, source=source, overwrite=overwrite)
    return ckpt
