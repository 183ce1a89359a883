"""Local weight files imported into the workspace: models/<name>/ and models/registry.json.

Nothing is ever downloaded: the site copies the files it was given (a vendor disk, a folder made
with `huggingface-cli download` on a connected machine) and `import_model` checks that they look
right for their kind, copies (or hard-links) them under models/<name>/ and records every file's
SHA-256, which `verify_models` checks again. site.yaml then refers to the copy by its path under
models/ (relative paths in site.yaml are relative to the workspace):

  r3d18-kinetics  torchvision r3d_18 state dict     train.kinetics_weights: models/<name>/<file>.pth
  cxr-bert        BERT folder (CXR-BERT)            train.text_model_dir (or pretrain.text_model_dir): models/<name>
  rad-dino        transformers Dinov2 folder        pretrain.encoder.weights_dir: models/<name> (family: dinov2)
  llm             causal LM folder, safetensors     labels.transformers.model_dir: models/<name>
  other           any file or folder, only hashed
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.fsutil import atomic_write
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace

KINDS = ("r3d18-kinetics", "cxr-bert", "rad-dino", "llm", "other")
SITE_YAML_KEY = {
    "r3d18-kinetics": "train.kinetics_weights",
    "cxr-bert": "train.text_model_dir",
    "rad-dino": "pretrain.encoder.weights_dir",
    "llm": "labels.transformers.model_dir",
}
REGISTRY = "registry.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BLOCK = 1 << 20
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class ModelImportError(ApplianceError):
    """The files do not look like the kind of model they were imported as, or cannot be registered."""


@dataclass
class ModelEntry:
    name: str
    kind: str
    reference: str  # the path to put in site.yaml, relative to the workspace
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "size"}
    total_bytes: int = 0
    imported_at: str = ""
    source_name: str = ""  # the folder or file name it came from (not its full path)
    linked: bool = False
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyResult:
    name: str
    kind: str
    files: int
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def models_dir(ws: Workspace) -> Path:
    return ws.root / "models"


# --- import ----------------------------------------------------------------------------------------
def import_model(ws: Workspace, kind: str, source: Path, *, name: str | None = None, link: bool = False,
                 replace: bool = False, progress: Progress | None = None) -> ModelEntry:
    """Check `source` for `kind`, copy it to models/<name>/, hash every file and register it."""
    if kind not in KINDS:
        raise ModelImportError(f"unknown model kind {kind!r} (allowed: {', '.join(KINDS)})")
    source = Path(source).expanduser()
    if not source.exists():
        raise ModelImportError(f"{source} does not exist")
    name = name or _default_name(kind, source)
    if not NAME_PATTERN.match(name):
        raise ModelImportError(f"model name {name!r}: use letters, digits, _ . - (at most 64, starting with a "
                               "letter or digit)")
    progress = progress or SilentProgress()
    root = models_dir(ws)
    root.mkdir(exist_ok=True)
    for stale in root.glob(".importing-*"):
        shutil.rmtree(stale, ignore_errors=True)
    registry = _load_registry(ws)
    final = root / name
    if (name in registry or final.exists()) and not replace:
        raise ModelImportError(f"a model named {name} is already in models/; choose another --name or use --replace")

    files = _source_files(source)
    details = check_model_files(kind, source, files)
    staging = root / f".importing-{name}-{os.getpid()}"
    staging.mkdir()
    entry = ModelEntry(name=name, kind=kind, reference="", imported_at=_now(), source_name=source.name,
                       linked=link, details=details)
    progress.start(f"import {name}", len(files))
    try:
        for rel, path in files.items():
            sha, size, linked = _place(path, staging / rel, link)
            entry.linked = entry.linked and linked
            entry.files[rel] = {"sha256": sha, "size": size}
            entry.total_bytes += size
            progress.advance()
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    single = kind == "r3d18-kinetics" or (source.is_file() and len(files) == 1)
    entry.reference = f"models/{name}/{next(iter(files))}" if single else f"models/{name}"
    registry[name] = entry.to_dict()
    _save_registry(ws, registry)
    return entry


def _default_name(kind: str, source: Path) -> str:
    stem = source.name if source.is_dir() else source.stem
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or kind
    return cleaned[:64]


def _source_files(source: Path) -> dict[str, Path]:
    """Relative name -> file. Links to files are followed (a Hugging Face cache snapshot is made of
    them); hidden folders (.git, .cache) are left out."""
    if source.is_file():
        return {source.name: source}
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            path = Path(dirpath) / fn
            if path.is_file():
                files[path.relative_to(source).as_posix()] = path
    if not files:
        raise ModelImportError(f"{source.name} holds no files")
    return files


def _place(src: Path, dst: Path, link: bool) -> tuple[str, int, bool]:
    """Hard-link (when asked and possible) or copy; return the SHA-256 and size of what is in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src.resolve(), dst)
            sha, size = _hash_file(dst)
            return sha, size, True
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(BLOCK):
            digest.update(block)
            fout.write(block)
            size += len(block)
    return digest.hexdigest(), size, False


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


# --- what each kind must look like -----------------------------------------------------------------
def check_model_files(kind: str, source: Path, files: dict[str, Path] | None = None) -> dict:
    """Raise ModelImportError unless `source` looks like a `kind` checkpoint; return what was found."""
    files = files if files is not None else _source_files(source)
    if kind == "other":
        return {}
    if kind == "r3d18-kinetics":
        return _check_r3d18(source, files)
    if not source.is_dir():
        raise ModelImportError(f"a {kind} model is a folder (config.json, weights, ...), not a single file")
    config = _read_config(source, kind)
    if kind == "cxr-bert":
        return _check_bert(source, files, config)
    if kind == "rad-dino":
        return _check_dinov2(source, files, config)
    return _check_llm(source, files, config)


def _check_r3d18(source: Path, files: dict[str, Path]) -> dict:
    candidates = [p for rel, p in files.items() if rel.endswith(TORCH_SUFFIXES)]
    if len(files) != 1 or len(candidates) != 1:
        raise ModelImportError("r3d18-kinetics is one state dict file (.pth), e.g. torchvision's "
                               "r3d_18-b3b3357e.pth")
    import torch
    from torchvision.models.video import r3d_18

    path = candidates[0]
    state = _torch_load(path, path.name)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelImportError(f"{path.name} is not a state dict of tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in r3d_18().state_dict().items()
                    if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelImportError(f"{path.name} is not an r3d_18 state dict ({len(missing)} of {len(expected)} "
                               f"backbone tensors missing, e.g. {missing[0]})")
    wrong = [k for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise ModelImportError(f"{path.name} is not an r3d_18 state dict ({wrong[0]} has shape "
                               f"{tuple(state[wrong[0]].shape)}, expected {expected[wrong[0]]})")
    fc = state.get("fc.weight")
    return {"tensors": len(state), "parameters": int(sum(v.numel() for v in state.values())),
            "classes": int(fc.shape[0]) if fc is not None else None,
            "dtype": str(state["stem.0.weight"].dtype).removeprefix("torch.")}


def _torch_load(path: Path, shown: str):
    """torch.load with weights_only=True (no code runs from the file), memory-mapped when the format allows."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ModelImportError(f"{shown} is not a plain PyTorch state dict ({_first_line(exc)})") from None


def _read_config(source: Path, kind: str) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise ModelImportError(f"{source.name} has no config.json: not a transformers {kind} folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelImportError(f"{source.name}/config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelImportError(f"{source.name}/config.json is not a JSON object")
    return config


def _check_bert(source: Path, files: dict[str, Path], config: dict) -> dict:
    if config.get("model_type") not in ("bert", "cxr-bert"):
        raise ModelImportError(f"{source.name}/config.json has model_type {config.get('model_type')!r}, not a BERT")
    if not any(rel in files for rel in ("vocab.txt", "tokenizer.json")):
        raise ModelImportError(f"{source.name} has no tokenizer (vocab.txt or tokenizer.json)")
    shapes = _weight_shapes(source, files, safetensors_only=False)
    _expect_tensor(source, shapes, "embeddings.word_embeddings.weight",
                   (config.get("vocab_size"), config.get("hidden_size")))
    return {"model_type": config["model_type"], "hidden_size": config.get("hidden_size"),
            "layers": config.get("num_hidden_layers"), "vocab_size": config.get("vocab_size"), "tensors": len(shapes)}


def _check_dinov2(source: Path, files: dict[str, Path], config: dict) -> dict:
    if config.get("model_type") != "dinov2":
        raise ModelImportError(f"{source.name}/config.json has model_type {config.get('model_type')!r}, "
                               "not a transformers Dinov2 (RAD-DINO) checkpoint")
    shapes = _weight_shapes(source, files, safetensors_only=False)
    patch = config.get("patch_size")
    _expect_tensor(source, shapes, "embeddings.patch_embeddings.projection.weight",
                   (config.get("hidden_size"), config.get("num_channels", 3), patch, patch))
    notes = [] if "preprocessor_config.json" in files else [
        "no preprocessor_config.json: the image normalisation falls back to the default"]
    return {"model_type": "dinov2", "hidden_size": config.get("hidden_size"), "layers": config.get("num_hidden_layers"),
            "patch_size": patch, "image_size": config.get("image_size"), "tensors": len(shapes), "notes": notes}


def _check_llm(source: Path, files: dict[str, Path], config: dict) -> dict:
    architectures = config.get("architectures") or []
    if not any(str(a).endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        raise ModelImportError(f"{source.name}/config.json names no causal LM architecture "
                               f"({', '.join(map(str, architectures)) or 'none'})")
    if not any(rel in files for rel in ("tokenizer.json", "tokenizer.model")):
        raise ModelImportError(f"{source.name} has no tokenizer (tokenizer.json or tokenizer.model)")
    shapes = _weight_shapes(source, files, safetensors_only=True)
    text = config.get("text_config") or config
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    if vocab and hidden and not any(s == (vocab, hidden) for s in shapes.values()):
        raise ModelImportError(f"{source.name}: no tensor of shape ({vocab}, {hidden}) (the token embedding "
                               "config.json describes): weights and config do not belong together")
    return {"model_type": config.get("model_type"), "architectures": architectures, "hidden_size": hidden,
            "vocab_size": vocab, "tensors": len(shapes),
            "parameters": int(sum(_numel(s) for s in shapes.values()))}


def _weight_shapes(source: Path, files: dict[str, Path], *, safetensors_only: bool) -> dict[str, tuple]:
    """Tensor name -> shape from the weight files (safetensors headers only; a .bin is memory-mapped)."""
    shards = _weight_files(source, files, safetensors_only)
    shapes: dict[str, tuple] = {}
    for rel in shards:
        path = files[rel]
        if rel.endswith(".safetensors"):
            shapes.update(_safetensors_shapes(path))
        else:
            state = _torch_load(path, f"{source.name}/{rel}")
            if not isinstance(state, dict):
                raise ModelImportError(f"{source.name}/{rel} is not a state dict")
            shapes.update({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")})
    return shapes


def _weight_files(source: Path, files: dict[str, Path], safetensors_only: bool) -> list[str]:
    kinds = (("model.safetensors", "model.safetensors.index.json"),) + (
        () if safetensors_only else (("pytorch_model.bin", "pytorch_model.bin.index.json"),))
    for single, index in kinds:
        if single in files:
            return [single]
        if index in files:
            try:
                shards = sorted(set(json.loads(files[index].read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ModelImportError(f"{source.name}/{index} is not a valid weight index") from None
            absent = [s for s in shards if s not in files]
            if absent:
                raise ModelImportError(f"{source.name}: {len(absent)} weight shard(s) named in {index} are missing "
                                       f"(e.g. {absent[0]})")
            return shards
    wanted = "model.safetensors" + ("" if safetensors_only else " or pytorch_model.bin")
    raise ModelImportError(f"{source.name} has no weights ({wanted}, or a sharded index)")


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    """Read only the JSON header of a .safetensors file (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
        size = path.stat().st_size
        shapes = {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if 8 + n + int(v["data_offsets"][1]) > size:
                raise ValueError("tensor data past the end of the file")
            shapes[k] = tuple(v["shape"])
        return shapes
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise ModelImportError(f"{path.name} is not a valid safetensors file ({_first_line(exc)})") from None


def _expect_tensor(source: Path, shapes: dict[str, tuple], suffix: str, shape: tuple) -> None:
    found = {k: s for k, s in shapes.items() if k.endswith(suffix)}
    if not found:
        raise ModelImportError(f"{source.name}: the weights have no {suffix} tensor")
    if None not in shape and tuple(shape) not in found.values():
        got = next(iter(found.values()))
        raise ModelImportError(f"{source.name}: {suffix} has shape {got}, but config.json says {tuple(shape)}")


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


# --- registry --------------------------------------------------------------------------------------
def _load_registry(ws: Workspace) -> dict[str, dict]:
    path = models_dir(ws) / REGISTRY
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return dict(data["models"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelImportError(f"models/{REGISTRY} is damaged; restore it from a backup") from None


def _save_registry(ws: Workspace, registry: dict[str, dict]) -> None:
    atomic_write(models_dir(ws) / REGISTRY,
                 json.dumps({"format": 1, "models": dict(sorted(registry.items()))}, indent=1) + "\n")


def list_models(ws: Workspace) -> list[ModelEntry]:
    return [ModelEntry(**entry) for _, entry in sorted(_load_registry(ws).items())]


def verify_models(ws: Workspace, names: list[str] | None = None,
                  progress: Progress | None = None) -> list[VerifyResult]:
    """Re-hash every registered file: missing, changed and unregistered extra files per model."""
    registry = _load_registry(ws)
    unknown = [n for n in names or [] if n not in registry]
    if unknown:
        raise ModelImportError(f"no model named {unknown[0]} in models/{REGISTRY}")
    entries = [ModelEntry(**registry[n]) for n in (names or sorted(registry))]
    progress = progress or SilentProgress()
    progress.start("verify models", sum(len(e.files) for e in entries))
    results = []
    for entry in entries:
        folder = models_dir(ws) / entry.name
        result = VerifyResult(entry.name, entry.kind, len(entry.files))
        for rel, recorded in sorted(entry.files.items()):
            path = folder / rel
            if not path.is_file():
                result.missing.append(rel)
            elif _hash_file(path) != (recorded["sha256"], recorded["size"]):
                result.changed.append(rel)
            progress.advance()
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        result.extra = sorted(on_disk - set(entry.files))
        results.append(result)
    return results


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
