"""benchmarks/throughput.py in its quick mode on a small corpus: every variant runs and reports sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT, project_env

# The reference every goal is stated against (the Trainer) and the job itself; the other variants differ in settings
# or share the plain-loop worker, and compile (about a minute) or emulated bf16 would cost the suite too much.
VARIANTS = ["trainer-naive", "job"]


def write_corpus(folder: Path, files: int = 36) -> Path:
    """Small Python modules, a third of them longer than the 64-token context, none alike (the job de-duplicates)."""
    folder.mkdir(parents=True)
    for i in range(files):
        lines = [f'"""Module {i} of the throughput test corpus."""', "", "import math", ""]
        for j in range(1 + (i % 3) * 4):
            lines += [f"def step_{i}_{j}(x, y={j}):", f"    total = x * {i} + y", f"    for k in range({j + 2}):",
                      "        total += math.sqrt(k + abs(x))", "    return total", ""]
        (folder / f"module_{i:02d}.py").write_text("\n".join(lines))
    return folder


@pytest.mark.slow
def test_quick_benchmark_reports_every_variant(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus")
    json_path, md_path = tmp_path / "throughput.json", tmp_path / "throughput.md"
    command = [sys.executable, "benchmarks/throughput.py", "--quick", "--context", "64", "--micro-batch", "2",
               "--vocab-size", "512",
               "--variants", ",".join(VARIANTS), "--corpus", str(corpus), "--work", str(tmp_path / "work"),
               "--json", str(json_path), "--md", str(md_path)]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600,
                            env=project_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(json_path.read_text())

    assert list(report["variants"]) == VARIANTS
    for name, variant in report["variants"].items():
        assert "error" not in variant, (name, variant["error"], result.stderr[-3000:])
        assert variant["median_tokens_per_s"] > 0, name
        assert variant["overall_tokens_per_s"] > 0, name
        assert variant["peak_rss_mib"] > 0, name
        assert variant["time_to_first_step_s"] > 0, name
        assert variant["job_ratio"] > 0, name
        assert len(variant["repeats"]) == 1 and len(variant["repeats"][0]["seconds"]) == 4, name  # 1 warm-up + 3 timed
    variants = report["variants"]
    assert variants["trainer-naive"]["corpus_share"] < 1
    assert variants["job"]["corpus_share"] == 1.0
    assert variants["job"]["job_ratio"] == 1.0
    assert report["limit_tokens_per_s"] > 0 and report["matmul"]["fp32"]["gflop_per_s"] > 0

    table = md_path.read_text()
    assert report["command"] in table and "benchmarks/throughput.py --quick" in table
    assert all(f"| {name} |" in table for name in VARIANTS)
    assert table.count("×") >= len(VARIANTS)  # the job ÷ variant column
    assert table in result.stdout
