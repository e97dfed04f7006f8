"""Write weights/catalogue.json: metadata of every table the EPD authors published (never the files themselves).

python -m scripts.make_catalogue [SHARED_DIR] [--out FILE]

SHARED_DIR holds local copies laid out as ``tpami/<file>.pkl`` (branch EPD-Solver++, upstream
``exps/<family>/<file>``) and ``iccv/<run>.pkl`` (tag ICCV-2025, upstream
``exps/<run>/network-snapshot-000010.pkl``); default ``$EPD_SHARED/epd_official`` or ``../shared/epd_official``.
Each file is read with the safe loader (``epd_core.load_params``) for its steps, points, NFE, schedule and backend.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from epd_core import load_params
from epd_core.catalogue import UPSTREAM, CatalogueEntry
from epd_core.files import EPDFileError, check_destination, write_atomic
from epd_dev import ROOT
from epd_dev.shared_data import OFFICIAL

RELEASES = {
    "tpami": {"commit": "88a91f0914069afd700bfee1b590c7b61ceae240", "ref": "branch EPD-Solver++ (TPAMI)"},
    "iccv": {"commit": "94c00d0f18de0636153440df7f1a9a13b80df247", "ref": "tag ICCV-2025"},
}
TPAMI_FAMILIES = ("sd3-1024", "sd3-512", "sd15", "flux")  # longest prefix first
ICCV_RUN = re.compile(
    r"^(?P<id>\d{5})-(?P<dataset>[a-z0-9_]+)-(?P<steps>\d+)-(?P<nfe>\d+)-(?P<student>epd|ipndm)-uni1\.0-afs$"
)


def _tpami(path: Path) -> dict:
    family = next(f for f in TPAMI_FAMILIES if path.stem.startswith(f + "-"))
    return {"name": f"tpami-{path.stem}", "family": family, "upstream": f"exps/{family}/{path.name}"}


def _iccv(path: Path) -> dict:
    run = ICCV_RUN.match(path.stem)
    if run is None:
        raise SystemExit(f"unexpected ICCV run name {path.name}")
    name = f"iccv-{run['id']}-{run['dataset']}-{run['steps']}-{run['nfe']}-{run['student']}"
    check = {"num_steps": int(run["steps"]), "nfe": int(run["nfe"]), "student": run["student"]}
    return {"name": name, "family": run["dataset"], "upstream": f"exps/{path.stem}/network-snapshot-000010.pkl",
            "check": check}  # fmt: skip


def entry(release: str, path: Path) -> dict:
    """One catalogue entry from a local copy of a published file."""
    where = _tpami(path) if release == "tpami" else _iccv(path)
    data = path.read_bytes()
    params = load_params(path)
    item = {
        "name": where["name"], "release": release, "family": where["family"], "comfyui": release == "tpami",
        "student": params.student, "num_steps": params.num_steps, "num_points": params.num_points,
        "nfe": params.nfe, "schedule_type": params.schedule_type, "backend": params.backend,
        "source_file": path.name, "url": f"{UPSTREAM}/{RELEASES[release]['commit']}/{where['upstream']}",
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "filename": f"{where['name']}.safetensors",
    }  # fmt: skip
    for key, expected in where.get("check", {}).items():
        if item[key] != expected:
            raise SystemExit(f"{path.name}: the run name says {key} {expected}, the file holds {item[key]}")
    if release == "iccv" and params.dataset_name != where["family"]:
        raise SystemExit(f"{path.name}: dataset {params.dataset_name} differs from the run name")
    CatalogueEntry(**item)  # the same checks the product applies
    return item


def build(shared: Path) -> dict:
    entries = [entry(release, path) for release in RELEASES for path in sorted((shared / release).glob("*.pkl"))]
    if len(entries) != 43:
        raise SystemExit(f"expected the 43 published files (11 TPAMI, 32 ICCV) in {shared}, found {len(entries)}")
    return {
        "format": 1,
        "about": "Tables published by the EPD-Solver authors (github.com/BeierZhu/EPD), pinned to a commit. Not "
        "redistributed: EPD Parameters Loader and `python -m epd_core fetch` download an entry on request, check "
        "its size and sha256 and convert it safely. num_steps counts time points (steps + 1). comfyui: usable on "
        "ComfyUI models (the ICCV tables are for the authors' pixel-space EDM and LSUN-bedroom LDM models).",
        "releases": RELEASES,
        "entries": entries,
    }


def main(argv: list[str] | None = None) -> int:
    default = OFFICIAL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shared", nargs="?", type=Path, default=default)
    parser.add_argument("--out", type=Path, default=ROOT / "weights" / "catalogue.json")
    args = parser.parse_args(argv)
    try:
        check_destination(args.out, True)  # before reading every table
    except EPDFileError as exc:
        parser.error(str(exc))
    doc = build(args.shared)
    write_atomic((json.dumps(doc, indent=2) + "\n").encode(), args.out, overwrite=True)
    print(f"wrote {args.out}: {len(doc['entries'])} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
