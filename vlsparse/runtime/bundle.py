"""Self-contained export bundles: what an app needs besides the weights, and a checked manifest.

Every export directory (``vlsparse export``, :func:`vlsparse.export.exporters.export_csr` /
:func:`~vlsparse.export.exporters.export_onnx`) is a bundle::

    DIR/config.json                          the model configuration
    DIR/model.safetensors | DIR/model.onnx   the weights (kind csr | onnx, onnx-sparse); ONNX models
                                             keep their initializers in model.onnx.data (earlier
                                             exports may have model.onnx alone)
    DIR/task.json                            answers (index = logit position), metric, region feature
                                             settings: extractor version, size D, train-split
                                             feature_mean / feature_std (D floats each), max_text_len
    DIR/ticket.json                          the ticket's metadata: sparsity (fraction), model, source
                                             task, method, IMP round, val_metric, and the metrics.json
                                             found beside the weights (val/test VQA score)
    DIR/tokenizer.json, tokenizer_config.json  the tokenizer (``tokenizers`` / transformers format)
    DIR/manifest.json                        format, kind, dtype of the stored weights (fp32, fp16,
                                             bf16, int8), vlsparse version, sha256 + size of every
                                             other file

task.json, ticket.json and the tokenizer come from :class:`BundleExtras`; an export without them has
only the model files and the manifest (it verifies, but :class:`vlsparse.Pipeline` refuses it).
:func:`read_bundle` checks the manifest first: a missing file, a file whose sha256 differs, a
manifest of an unknown format or one written by a newer vlsparse, a listed path that is not a plain
relative name inside the bundle or that goes through a symlink each raise :class:`BundleError` with
one line naming the file. Then the contents (:mod:`vlsparse.runtime.checks`): config.json's sizes,
task.json against the model's head and region features (finite statistics, std > 0).
:class:`vlsparse.Pipeline` adds the tokenizer and the model file before the first call. This module
imports no torch (the ONNX runtime path uses it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlsparse._version import __version__
from vlsparse.atomic import write_json
from vlsparse.runtime.checks import ANSWER_FIELDS, REGION_FIELDS, BundleError, check_config, check_manifest_entry, check_task

__all__ = ["FORMAT", "KINDS", "DTYPES", "MANIFEST", "BundleError", "BundleExtras", "Bundle", "write_bundle", "read_bundle",
           "find_task_info", "ticket_metadata", "sha256"]

FORMAT = "vlsparse-bundle-1"
MANIFEST = "manifest.json"
#: bundle kind -> its model file
CSR_FILE, ONNX_FILE = "model.safetensors", "model.onnx"
KINDS = {"csr": CSR_FILE, "onnx": ONNX_FILE, "onnx-sparse": ONNX_FILE}
#: what manifest.json's "dtype" may say (the stored pruned weights; absent in older bundles: fp32)
DTYPES = ("fp32", "fp16", "bf16", "int8")
TASK_FILE, TICKET_FILE, TOKENIZER_FILE = "task.json", "ticket.json", "tokenizer.json"
__all__ += ["ANSWER_FIELDS", "REGION_FIELDS"]


@dataclass
class BundleExtras:
    """What an export writes next to the model so that an app can use it.

    Attributes:
        task_info: :func:`vlsparse.data.task_info` of the task (the contents of RUN/task.json).
        tokenizer: a transformers fast tokenizer (its ``save_pretrained`` writes tokenizer.json).
        ticket: the ticket's metadata, e.g. :func:`ticket_metadata` (JSON-able dict).
    """

    task_info: dict | None = None
    tokenizer: Any = None
    ticket: dict | None = None


@dataclass
class Bundle:
    """A verified bundle. ``config``, ``task``, ``ticket``: the parsed JSON files ({} when absent)."""

    path: Path
    manifest: dict
    config: dict
    task: dict
    ticket: dict

    @property
    def kind(self) -> str:
        """"csr", "onnx" or "onnx-sparse"."""
        return self.manifest["kind"]

    @property
    def model_file(self) -> Path:
        return self.path / KINDS[self.kind]

    def has(self, name: str) -> bool:
        """Whether the manifest lists ``name`` (a path relative to the bundle)."""
        return name in self.manifest["files"]


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(directory: str | Path, kind: str, extras: BundleExtras | None = None, dtype: str = "fp32") -> dict:
    """Write task.json, ticket.json and the tokenizer files from ``extras`` into ``directory`` (which
    already holds config.json and the model file), then manifest.json over every file; returns the manifest.
    ``dtype``: the stored weights' dtype (one of :data:`DTYPES`), recorded in the manifest.

    Raises:
        BundleError: unknown ``kind``, model file missing, task info that does not fit config.json
            (answer count vs num_answers, region_feature_dim vs img_dim), or a tokenizer that writes no
            tokenizer.json (a slow tokenizer).
    """
    directory = Path(directory)
    if kind not in KINDS:
        raise BundleError(f"bundle kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if dtype not in DTYPES:
        raise BundleError(f"bundle dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (directory / KINDS[kind]).is_file():
        raise BundleError(f"{directory / KINDS[kind]}: the {kind} bundle's model file is missing")
    extras = extras or BundleExtras()
    if extras.task_info is not None:
        check_task(extras.task_info, json.loads((directory / "config.json").read_text()))
        write_json(directory / TASK_FILE, extras.task_info)
    if extras.ticket is not None:
        write_json(directory / TICKET_FILE, extras.ticket)
    if extras.tokenizer is not None:
        extras.tokenizer.save_pretrained(str(directory))
        if not (directory / TOKENIZER_FILE).is_file():
            raise BundleError(f"tokenizer {type(extras.tokenizer).__name__} wrote no {TOKENIZER_FILE}: "
                              "a fast (tokenizers-backed) tokenizer is needed")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "kind": kind, "dtype": dtype, "vlsparse_version": __version__,
                "files": {p.relative_to(directory).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
                          for p in files}}
    write_json(directory / MANIFEST, manifest)
    return manifest


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d{1,9}", str(v))[:3])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: unreadable JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def read_bundle(path: str | Path) -> Bundle:
    """Verify a bundle against its manifest and parse its JSON files.

    Checks, in order: the directory and manifest.json exist; the manifest's format is
    ``vlsparse-bundle-1`` and its vlsparse version is not newer than this one; its kind is known; every
    listed path is a plain relative name inside the bundle, through no symlink, and the file exists with
    the listed size (bytes) and sha256; config.json and the model file are listed; config.json, task.json
    and ticket.json are JSON objects; config.json's sizes are positive integers; task.json fits the model
    (:func:`vlsparse.runtime.checks.check_task`: answers vs head, region feature size, finite statistics
    with std > 0).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        BundleError: any failed check, one line naming the file (and the version, for newer manifests).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: bundle directory not found")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; not a vlsparse bundle (write one with `vlsparse export`)")
    if mpath.is_symlink():
        raise BundleError(f"{mpath}: a symlink; bundles hold plain files only")
    manifest = _read_json(mpath)
    fmt, version = str(manifest.get("format", "")), str(manifest.get("vlsparse_version", ""))
    if _version(version) > _version(__version__):
        raise BundleError(f"{mpath}: written by vlsparse {version}, newer than this vlsparse {__version__}; "
                          "upgrade vlsparse to load it")
    if fmt != FORMAT:
        raise BundleError(f"{mpath}: format {fmt!r} is not {FORMAT!r}")
    if not isinstance(manifest.get("kind"), str) or manifest["kind"] not in KINDS \
            or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{mpath}: kind {manifest.get('kind')!r} is not one of {', '.join(KINDS)}, "
                          "or the file list is missing")
    if manifest.get("dtype", "fp32") not in DTYPES:
        raise BundleError(f"{mpath}: dtype {manifest.get('dtype')!r:.40} is not one of {', '.join(DTYPES)}")
    for name, entry in manifest["files"].items():
        f = check_manifest_entry(path, name, entry, mpath)
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle (listed in {MANIFEST})")
        if f.stat().st_size != entry["bytes"] or sha256(f) != entry["sha256"]:
            raise BundleError(f"{f}: checksum mismatch with {MANIFEST} (the file was altered after export)")
    for name in ("config.json", KINDS[manifest["kind"]]):
        if name not in manifest["files"]:
            raise BundleError(f"{mpath}: does not list {name}")
    optional = {name: _read_json(path / name) if name in manifest["files"] else {} for name in (TASK_FILE, TICKET_FILE)}
    config = _read_json(path / "config.json")
    check_config(config, path / "config.json")
    if optional[TASK_FILE]:
        check_task(optional[TASK_FILE], config, path / TASK_FILE)
    return Bundle(path, manifest, config, optional[TASK_FILE], optional[TICKET_FILE])


def find_task_info(weights: str | Path) -> Path | None:
    """task.json beside ``weights`` (train-ticket's out dir, RUN/theta0.safetensors) or one level up
    (RUN/level_XX/weights.safetensors of find-ticket), else None."""
    weights = Path(weights)
    for d in (weights.parent, weights.parent.parent):
        if (d / TASK_FILE).is_file():
            return d / TASK_FILE
    return None


def ticket_metadata(meta: dict[str, str], sparsity: float, weights: str | Path | None = None) -> dict:
    """ticket.json contents: the ticket header ``meta`` (strings; ``val_metric`` parsed from JSON), the
    actual global ``sparsity`` (fraction), and ``metrics``: the metrics.json beside ``weights`` if any."""
    out: dict = {k: v for k, v in meta.items()}
    try:
        out["val_metric"] = json.loads(meta.get("val_metric") or "{}")
    except json.JSONDecodeError:
        pass
    out["sparsity"] = float(sparsity)
    metrics = Path(weights).parent / "metrics.json" if weights is not None else None
    if metrics is not None and metrics.is_file():
        out["metrics"] = _read_json(metrics)
    return out
