"""Mutation testing of one module against its own test selection (docs/development.md, "Mutation testing").

plan.py and checkpoint.py run straight from pyproject's [tool.mutmut]: `mutmut run --max-children 1`.
The other modules need other tests, and mutmut reads its settings only from ./pyproject.toml, so this
script runs mutmut in mutants/<module>/: links to surgery/, exporters/ and tests/, and a pyproject.toml
whose [tool.mutmut] table is replaced by the module's row of MODULES below. Results stay there
(`cd mutants/engine && mutmut results`).

    pip install mutmut==3.8.1                      # dev-only, not in the test extra
    python .ci/mutation.py                         # view.py (the default); one worker, micro-model tests
    python .ci/mutation.py --module architecture   # or engine; further arguments go to `mutmut run`
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COMMON: dict[str, str | list[str]] = {
    "source_paths": ["surgery/"],
    "also_copy": ["exporters/"],
    "pytest_add_cli_args": ["-m", "not real and not slow", "-p", "no:cacheprovider"],
}
MODULES: dict[str, dict[str, str | list[str]]] = {
    # Micro models (hidden size 16, 4 layers) and hand-made blocks: seconds per mutant. test_view.py
    # itself (tiny models of 12 families, written checkpoints, generation) takes minutes per mutant.
    # A fork server: forked from mutmut's process after the stats run, whose forward passes started
    # torch's thread pool, a mutant's first forward pass can wait forever (and counts as a timeout).
    "view": {
        **_COMMON,
        "process_isolation": "forkserver",
        "only_mutate": ["surgery/view.py"],
        "pytest_add_cli_args_test_selection": [
            "tests/test_view_edges.py",
            "tests/test_view.py::test_view_refuses_a_positional_setting_it_would_change",
        ],
    },
    # Detection from files and through transformers, config checks and remapping; no model is run.
    "architecture": {
        **_COMMON,
        "only_mutate": ["surgery/architecture.py"],
        "pytest_add_cli_args_test_selection": [
            "tests/test_architecture.py",
            "tests/test_architecture_edges.py",
            "tests/test_malformed.py::test_malformed_config_is_one_line",
            "tests/test_malformed.py::test_config_transformers_refuses_is_one_line",
            "tests/test_malformed.py::test_cli_refuses_generated_malformed_configs",
        ],
    },
    # Which tensors are read and written where, the config and the other files of OUT; no model is run.
    # A fork server: forked straight from mutmut's process (threads started by the writes' progress
    # bars), a mutant's run can wait forever on a lock no thread will release.
    "engine": {
        **_COMMON,
        "process_isolation": "forkserver",
        "only_mutate": ["surgery/engine.py"],
        "pytest_add_cli_args_test_selection": [
            "tests/test_streaming.py",
            "tests/test_engine_edges.py",
            "tests/test_malformed.py::test_index_decides_which_copy_of_a_tensor_is_read",
            "tests/test_malformed.py::test_tensor_in_two_shards_that_the_index_does_not_name_is_refused",
            "tests/test_malformed.py::test_index_naming_the_wrong_shard_is_refused",
        ],
    },
}


def main(argv: list[str]) -> int:
    module = "view"
    if argv[:1] == ["--module"] and len(argv) > 1:
        module, argv = argv[1], argv[2:]
    if module not in MODULES:
        print(f"mutation.py: --module is one of {', '.join(MODULES)}, not {module!r}", file=sys.stderr)
        return 2
    work = ROOT / "mutants" / module
    work.mkdir(parents=True, exist_ok=True)
    for name in ("surgery", "exporters", "tests"):
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    # Drop the core's [tool.mutmut] table (up to the next table or the end), then add the module's.
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    table = "".join(f"{key} = {json.dumps(value)}\n" for key, value in MODULES[module].items())  # JSON lists are TOML
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n[tool.mutmut]\n" + table, encoding="utf-8")
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.call([str(mutmut), "run", "--max-children", "1", *argv], cwd=work, env=os.environ)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
