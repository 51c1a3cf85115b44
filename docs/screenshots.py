"""Refresh the console's screenshots in the README (docs/img/console-*.png).

They are taken by the browser tests themselves (tests/integration/test_console_browser.py), which
otherwise write them to a temporary folder, so a clone's tests never touch docs/img and the
README's pictures are of the pages the tests checked. Needs Debian's Chromium (bash .ci/chromium).

    .venv/bin/python docs/screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"LORAFLOW_TEST_SCREENSHOTS": str(OUT), "LORAFLOW_TEST_CHROMIUM": "/usr/bin/chromium"}
    test = "tests/integration/test_console_browser.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", test], cwd=ROOT, env=env
    )
    if done.returncode == 0:
        print("\n".join(sorted(str(p.relative_to(ROOT)) for p in OUT.glob("console-*.png"))))
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
