"""Mutation testing of surgery/view.py against the tiny-model view tests (README "Mutation testing").

The core (plan.py, checkpoint.py) runs straight from pyproject's [tool.mutmut]: `mutmut run --max-children 1`.
view.py needs other tests, and mutmut reads its settings only from ./pyproject.toml, so this script runs
mutmut in mutants/view/: links to surgery/, exporters/ and tests/, and a pyproject.toml whose
[tool.mutmut] table is replaced by VIEW below. Results stay there (`cd mutants/view && mutmut results`).

    pip install mutmut==3.8.1       # dev-only, not in the test extra
    python .ci/mutation.py          # one worker; the tiny-model tests only
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "mutants" / "view"

VIEW = {
    "source_paths": ["surgery/"],
    "only_mutate": ["surgery/view.py"],
    "also_copy": ["exporters/"],
    "pytest_add_cli_args": ["-m", "not real and not slow", "-p", "no:cacheprovider"],
    "pytest_add_cli_args_test_selection": ["tests/test_view.py"],
}


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    for name in ("surgery", "exporters", "tests"):
        link = WORK / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    # Drop the core's [tool.mutmut] table (up to the next table or the end), then add VIEW.
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    table = "".join(f"{key} = {json.dumps(value)}\n" for key, value in VIEW.items())  # JSON lists/strings are TOML
    (WORK / "pyproject.toml").write_text(text.rstrip() + "\n\n[tool.mutmut]\n" + table, encoding="utf-8")
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.call([str(mutmut), "run", "--max-children", "1", *sys.argv[1:]], cwd=WORK, env=os.environ)


if __name__ == "__main__":
    sys.exit(main())
