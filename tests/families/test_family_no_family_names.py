"""A family is data: outside core/families/ and the backends' model entries, no product file names one.

Every model_type of the registry (and the families the roadmap names) is searched for as a word in
every product .py file; tests/, tools/ and docs/ are not product code.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from vltune.core.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = re.compile(r"^(core/families/|backends/[a-z]+/models/|tests/|tools/|docs/)")
ROADMAP = ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "ovis2_5")


def _product_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [ROOT / f for f in listed if not ALLOWED.match(f) and (ROOT / f).exists()]


def test_no_product_file_names_a_family():
    names = sorted(set(FAMILIES) | set(ROADMAP), key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9])")
    files = _product_files()
    assert len(files) > 50, "the search found too few product files"
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, "family names outside core/families and backends/*/models:\n" + "\n".join(hits)


def test_the_search_finds_a_planted_name(tmp_path):
    """The pattern catches a name in a string, an f-string and a comparison (so an empty result means something)."""
    names = sorted(set(FAMILIES), key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9])")
    for line in ('if model_type == "qwen2_5_vl":', "x = f'{qwen3_vl}'", "choices=('qwen2_vl',)", 'm.startswith("qwen3_vl_")'):
        assert pattern.search(line), line
    assert not pattern.search("QWEN3_VL_CHAT_TEMPLATE = 1")
