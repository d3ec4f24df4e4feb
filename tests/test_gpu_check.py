"""benchmarks/gpu_check.py --tiny: the prepared GPU check runs its own code on a CPU, so it cannot rot before a GPU
comes. Every field the GPU run will fill is here and plausible; a part cut off by its timeout says so and leaves
the file whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_gpu_check_tiny_fills_every_field(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run("--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["device"]["name"] == "cpu" and d["device"]["tiny"] is True and d["device"]["compute_capability"] is None
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(d["libraries"])

    bf16 = d["round"]["bfloat16"]
    assert bf16["status"] == "ok" and bf16["seconds"] > 0 and bf16["base_identical_in_every_round"] is True
    assert d["round"]["float16"]["status"].startswith("skipped")  # fp16 with its scaler needs a GPU
    for k in ("1", "2"):
        r = bf16["rounds"][k]
        assert all(r["stage_seconds"][s] > 0 for s in ("responses", "train", "eval"))
        assert all(v > 0 for v in r["peak_memory_gb"].values()) and "train" in r["peak_memory_gb"]
        assert r["stack"]["new_adapter_moved"] is True and r["stack"]["loaded_dtype"] in ("torch.bfloat16",
                                                                                          "torch.float32")
        assert r["trainer_precision"] == {"bf16": False, "fp16": False, "use_cpu": True}
        assert r["grad_scaler"] is False
        kernels = r["fused_kernels"]  # on a CPU Unsloth never imports its kernels: null, and said why
        assert set(kernels) >= {"LoRA_QKV", "LoRA_W", "LoRA_MLP", "multiple_active_adapters", "single_active_adapter"}
        if d["round_backend"] == "unsloth":
            assert kernels["LoRA_QKV"] is None and "not imported" in kernels["note"]
    assert bf16["rounds"]["1"]["stack"]["frozen_equal_their_files"] == {}
    assert bf16["rounds"]["2"]["stack"]["frozen_equal_their_files"] == {"1": True}  # round 1 untouched in round 2
    assert all(bf16["rounds"][k]["stack"]["one_adapter"] is True for k in ("1", "2"))  # round 1 concatenated in 2
    ratios = bf16["round2_over_round1_step"]
    assert set(ratios) == {"sft", "dpo"} and all(v > 0 for v in ratios.values())

    shapes = d["shapes"]
    assert shapes["build"]["status"] == "ok" and shapes["model"]["hidden_size"] > 0
    backends = ["unsloth", "transformers"] if d["unsloth_importable"] else ["transformers"]
    for backend in backends:
        b = shapes[backend]
        assert b["status"] == "ok" and b["load"]["seconds"] >= 0 and b["load"]["peak_gb"] > 0
        assert sorted(b["generation"], key=int) == ["1", "2", "4"]
        assert all(g["tokens_per_s"] > 0 and g["peak_gb"] > 0 and g["planner_gb"] >= 0 for g in b["generation"].values())
        for stage in ("sft", "dpo", "kto", "simpo", "orpo"):
            assert sorted(b[stage], key=int) == ["64", "128"]
            assert all(s["seconds"] > 0 and s["peak_gb"] > 0 and s["planner_gb"] > 0 for s in b[stage].values())


def test_a_part_cut_off_says_so_and_the_file_stays_whole(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run("--part", "round", "--timeout", "3", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())  # valid JSON: every write is atomic
    assert d["round"]["bfloat16"]["status"] == "cut off after 3 s (figures so far kept)"
    assert d["device"]["name"] == "cpu" and "shapes" not in d


def test_without_a_gpu_and_without_tiny_it_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--tiny" in proc.stderr


def test_a_trimmed_wheel_installs_without_the_dropped_files(tmp_path):
    import base64
    import hashlib
    import zipfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from collect_wheels import trim

    def line(name, data):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}"

    files = {"pkg/__init__.py": b"VALUE = 1\n", "pkg/libbig_cuda118.so": b"\0" * 50_000,
             "pkg/libbig_cuda130.so": b"\1" * 1000, "pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\n"
             b"Version: 1.0\n", "pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
             b"true\nTag: py3-none-any\n"}
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", "\n".join([line(n, d) for n, d in files.items()]
                                                         + ["pkg-1.0.dist-info/RECORD,,"]) + "\n")
    assert trim(wheel, lambda n: n.endswith("cuda118.so")) > 0
    assert trim(wheel, lambda n: n.endswith("cuda118.so")) == 0  # nothing left to drop: untouched
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (target / "pkg" / "libbig_cuda130.so").read_bytes() == files["pkg/libbig_cuda130.so"]
    assert not (target / "pkg" / "libbig_cuda118.so").exists()
    record = (target / "pkg-1.0.dist-info" / "RECORD").read_text()
    assert "cuda118" not in record and line("pkg/__init__.py", files["pkg/__init__.py"]) in record
