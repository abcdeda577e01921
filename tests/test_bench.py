"""Smoke test of ``python -m bench``: the whole benchmark runs on the tiny model and writes its results. No timing
is asserted: the numbers belong to whatever machine runs the tests."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_bench_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "bench", "--sizes", "tiny", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, timeout=300)

    results = json.loads((out / "results.json").read_text())
    tiny = results["sizes"]["tiny"]
    assert {"ours", "reference", "transformers"} <= set(tiny["figures"])
    assert tiny["export"]["seconds"] > 0 and tiny["export"]["peak_rss_bytes"] > tiny["export"]["weight_bytes"]
    assert results["machine"]["read_bandwidth_bytes_per_s"]["best"] > 0
    for stats in tiny["ratios"]["ours"]["decode_vs_transformers"].values():
        assert 0 < stats["min"] <= stats["median"]
    assert tiny["profile"]["op_ms_per_step"]
    assert (out / "results.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| ours |" in (out / "results.md").read_text()
