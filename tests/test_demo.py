"""samples/demo.py (`make demo`) end to end on tiny models: the answer on stdout; on stderr the
usage, the cloud-alone rate beside it, and nothing else (no warning, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "samples" / "demo.py"


def test_the_demo_states_the_speculative_and_the_cloud_alone_rates():
    out = subprocess.run([sys.executable, str(DEMO), "--drafter", "tiny-llama", "--target", "tiny-llama",
                          "--max-new-tokens", "8", "--draft-len", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tokens/round" in out.stderr
    text = " ".join(out.stderr.split())  # the console wraps long lines
    assert re.search(r"cloud alone on the same gateway: \d+ tokens in [\d.]+ s \([\d.]+ tok/s\); speculative is [\d.]+x that", text)
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr
