"""Write results/{exp}/manifest.json: git commit, package versions, the experiment's config hash, input file
hashes, seeds, the chat-template hashes seen at training and at generation (they must agree), and where the
experiment's Hub datasets came from (name, config, split, revision and the commit sha they resolved to).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq

from workflow_scripts.io import sha256_file, write_json

PACKAGES = ["torch", "transformers", "peft", "accelerate", "snakemake", "pyarrow", "numpy", "rouge-score",
            "deepspeed", "vllm", "openai"]


def tree_sha256(path: Path) -> str:
    """Hash of a file, or of a folder's files (names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def template_hashes(models: list[Path], generations: list[Path]) -> dict:
    seen = {}
    for m in models:
        log = Path(m) / "train_log.json"
        if log.exists():
            seen[str(log)] = json.loads(log.read_text()).get("chat_template_sha256")
    for g in generations:
        meta = json.loads((pq.read_schema(g).metadata or {}).get(b"safeft", b"{}"))
        seen[str(g)] = meta.get("chat_template_sha256")
    return seen


def training_precision(models: list[Path]) -> dict:
    """The precision each training run resolved (`dtype: auto` depends on the machine) and where it ran."""
    out = {}
    for m in models:
        log = Path(m) / "train_log.json"
        if log.exists():
            info = json.loads(log.read_text())
            out[str(m)] = {"precision": info.get("precision"), "hardware": info.get("hardware")}
    return out


def build_manifest(exp: str, exp_config: dict, inputs: list[str], models: list[str], generations: list[str],
                   seeds: list[int], downloads: list[str] = ()) -> dict:
    hashes = template_hashes([Path(m) for m in models], [Path(g) for g in generations])
    distinct = {h for h in hashes.values() if h}
    return {
        "experiment": exp,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": versions(),
        "config": exp_config,
        "config_sha256": hashlib.sha256(json.dumps(exp_config, sort_keys=True).encode()).hexdigest(),
        "seeds": seeds,
        "inputs": {p: tree_sha256(Path(p)) for p in inputs + models + generations},
        "chat_template_sha256": hashes,
        "chat_template_consistent": len(distinct) <= 1,
        "training": training_precision([Path(m) for m in models]),
        "downloads": {p: json.loads(Path(p).read_text()) for p in downloads},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--config_json", required=True, help="the experiment's resolved config as JSON")
    ap.add_argument("--inputs", nargs="*", default=[])
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--generations", nargs="*", default=[])
    ap.add_argument("--seeds", nargs="*", type=int, default=[])
    ap.add_argument("--downloads", nargs="*", default=[], help="provenance JSON of Hub downloads (hub.json)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    manifest = build_manifest(args.experiment, json.loads(args.config_json), args.inputs, args.models,
                              args.generations, args.seeds, args.downloads)
    if not manifest["chat_template_consistent"]:
        raise SystemExit(f"error: {args.experiment}: training and generation used different chat templates: "
                         f"{manifest['chat_template_sha256']}")
    write_json(manifest, args.output)


if __name__ == "__main__":
    main()
