"""Collect, into an ignored folder, the wheels an offline GPU machine lacks for benchmarks/gpu_check.py.

    python benchmarks/collect_wheels.py [--dest wheels] [--python 3.12] [--cuda 130] [--budget-mib 64] [--with NAME]

One such image (REFERENCE.md: Python 3.12, torch 2.11 with CUDA 13, transformers 5.17, peft, accelerate, triton,
rich, pyyaml, matplotlib, numpy) lacks the packages in MISSING. The wheels travel with the working tree, 64 MiB in
all, and two are too big as published:

- bitsandbytes 0.50.2 (42 MB) ships a library for every CUDA version: only `libbitsandbytes_cuda<--cuda>.so` and
  the CPU one are kept (about 4 MB);
- unsloth 2026.10.9 (28 MB) carries its Studio web app (`studio/`), which training never imports: dropped.

A trimmed wheel is rewritten with its RECORD updated, so pip installs it as any other. The script prints each
wheel's size and the total, and exits 1 when the total is over the budget. On the GPU machine:

    pip install --no-index --no-deps wheels/*.whl

`--with pyarrow` adds datasets' storage library where the image lacks it too: 54 MB as published, trimmed of Flight,
S3 (which datasets never imports); `--with NAME` adds any other package.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the image lacks, pinned to what lora_cai is tested with here; the small dependencies they pull in too.
MISSING = ["bitsandbytes==0.50.2", "trl==1.15.0", "unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "datasets==4.8.5",
           "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types", "typing-inspection", "dill==0.4.1",
           "multiprocess==0.70.19", "xxhash", "tyro", "docstring-parser", "shtab", "typeguard", "torchao",
           "cut_cross_entropy", "msgspec", "gguf"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
MIB = 1 << 20
# pyarrow's optional parts that `datasets` never imports (pyarrow.fs skips a filesystem whose module is absent).
PYARROW_UNUSED = ("arrow_flight", "_flight", "arrow_s3", "_s3fs")


def download(specs: list[str], dest: Path, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--dest", str(dest), "--quiet"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + specs, check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim(wheel: Path, drop) -> int:
    """Rewrite `wheel` without the files `drop(name)` selects, RECORD updated; return the bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as z:
        kept = [i for i in z.infolist() if not drop(i.filename)]
        if len(kept) == len(z.infolist()):
            return 0
        record_name = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
        files = {i.filename: z.read(i) for i in kept if i.filename != record_name}
    lines = [_record_line(name, data) for name, data in files.items()] + [f"{record_name},,"]
    tmp = Path(tempfile.mkstemp(suffix=".whl", dir=wheel.parent)[1])
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(record_name, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / "wheels", help="where the wheels go (ignored by git)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--cuda", default="130", help="the CUDA version bitsandbytes must run on: 130 for CUDA 13.0")
    ap.add_argument("--budget-mib", type=float, default=64.0)
    ap.add_argument("--with", dest="extra", action="append", default=[], help="another package to collect")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    download(MISSING + args.extra, args.dest, args.python)

    keep_lib = f"libbitsandbytes_cuda{args.cuda}.so"
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            libs = [n for n in z.namelist() if n.startswith("bitsandbytes/libbitsandbytes_")]
        if libs and not any(n.endswith(keep_lib) for n in libs) and any("cuda" in n for n in libs):
            print(f"collect_wheels: {wheel.name} has no {keep_lib}; it has "
                  f"{', '.join(sorted(Path(n).name for n in libs))}", file=sys.stderr)
            return 2
        saved = trim(wheel, lambda n: n.startswith("bitsandbytes/libbitsandbytes_") and not n.endswith(
            (keep_lib, "libbitsandbytes_cpu.so")))
        print(f"{wheel.name}: kept {keep_lib} and the CPU library, {saved / MIB:.1f} MiB less")
    for wheel in args.dest.glob("unsloth-*.whl"):
        saved = trim(wheel, lambda n: n.startswith("studio/"))
        print(f"{wheel.name}: dropped studio/ (the web app), {saved / MIB:.1f} MiB less")

    for wheel in args.dest.glob("pyarrow-*.whl"):
        saved = trim(wheel, lambda n: any(part in Path(n).name for part in PYARROW_UNUSED))
        print(f"{wheel.name}: dropped Flight and S3 (datasets uses neither), {saved / MIB:.1f} MiB less")

    wheels = sorted(args.dest.glob("*.whl"), key=lambda w: -w.stat().st_size)
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / MIB:8.2f} MiB  {w.name}")
    print(f"total: {total / MIB:.2f} MiB of {args.budget_mib:g} MiB ({len(wheels)} wheels in {args.dest})")
    if total > args.budget_mib * MIB:
        print(f"collect_wheels: over the budget by {(total - args.budget_mib * MIB) / MIB:.1f} MiB; the largest is "
              f"{wheels[0].name}: carry it in another call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
