"""The README's quickstart runs as written and does what it says."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_learns():
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README quickstart", "exec"), {})
    text = out.getvalue()
    assert "trainable params: 260 ||" in text
    loss, answer = re.search(r"loss ([\d.]+) answer (\d+)", text).groups()
    assert float(loss) < 0.5 and answer == "9"  # from about ln(64) = 4.2 at the start
