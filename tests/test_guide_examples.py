"""kluster.ai's own end-to-end Python examples, run unchanged against the emulator.

Only the base_url, the key prompt and the poll sleep are changed, as the issue allows.
The guide is read from KLUSTER_GUIDE_PATH, shared/reference beside the checkout, or
/work/shared/reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_API_KEY

_GUIDE_NAME = Path("shared") / "reference" / "kluster-batch-guide.md"
# KLUSTER_GUIDE_PATH, else beside the checkout (../shared), else the workplace's copy.
_CANDIDATES = [
    *([Path(os.environ["KLUSTER_GUIDE_PATH"])] if os.environ.get("KLUSTER_GUIDE_PATH") else []),
    Path(__file__).resolve().parents[2] / _GUIDE_NAME,
    Path("/work") / _GUIDE_NAME,
]
GUIDE = next((p for p in _CANDIDATES if p.is_file()), _CANDIDATES[0])


def end_to_end_examples() -> list[tuple[str, str]]:
    if not GUIDE.exists():
        return []
    text = GUIDE.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(r"^([^\n]*)\n```python\n(.*?)```", text, flags=re.S | re.M):
        title, code = match.group(1).strip(), match.group(2)
        if "client.batches.create" in code and "while True" in code:
            found.append((f"{len(found) + 1}-{title or 'example'}", code))
    return found


EXAMPLES = end_to_end_examples()


def adapt(code: str, base_url: str) -> str:
    changed = code.replace('"https://api.kluster.ai/v1"', repr(base_url))
    changed = re.sub(r"getpass\([^)]*\)", repr(TEST_API_KEY), changed)
    changed = re.sub(r"time\.sleep\(\s*10\s*\)", "time.sleep(0.05)", changed)
    assert changed.count(repr(base_url)) == 1 and repr(TEST_API_KEY) in changed
    return changed


def test_the_guide_has_end_to_end_examples():
    if not GUIDE.exists():
        pytest.skip(f"guide not found at {GUIDE}")
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_guide_example_runs_against_the_emulator(tmp_path, emulator, name, code):
    script = tmp_path / "example.py"
    script.write_text(adapt(code, emulator.base_url))
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Batch status: completed" in run.stdout
    assert "Batch failed" not in run.stdout
    requests_sent = (tmp_path / "my_batch_request.jsonl").read_text().splitlines()
    saved = tmp_path / "batch_results.jsonl"
    if saved.exists():  # the "retrieve results" example writes its output to a file
        assert len(saved.read_text().splitlines()) == len(requests_sent)
    else:
        assert "[kluster.ai emulator]" in run.stdout
    assert emulator.stats()["requests"]["POST /v1/batches"] == 1
