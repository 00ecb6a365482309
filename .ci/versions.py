"""Which versions of a dependency the compatibility run installs (used by .ci/compat).

    python .ci/versions.py transformers oldest   # the lowest release pyproject.toml allows
    python .ci/versions.py transformers newest   # the highest release pyproject.toml allows
    python .ci/versions.py transformers next     # the highest release on the index, allowed or not

Releases come from the package index (`pip index versions`); pre-releases are ignored, and so is a
release that cannot be installed beside the project's other dependencies (`pip install --dry-run`
fails; transformers 5.25.0 was such a release for a while, published before the `kernels` release
it needs), since it cannot be tested.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def dependencies() -> list[Requirement]:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def declared(name: str) -> Requirement:
    for requirement in dependencies():
        if requirement.name.lower() == name.lower():
            return requirement
    raise SystemExit(f"{name} is not a dependency in pyproject.toml")


def released(name: str) -> list[Version]:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"Available versions: (.*)", listing)
    if not found:
        raise SystemExit(f"the index lists no releases of {name}")
    versions = [Version(v.strip()) for v in found.group(1).split(",")]
    return sorted(v for v in versions if not v.is_prerelease)


def installable(name: str, version: Version) -> bool:
    """Whether pip can resolve ``name==version`` together with the project's other dependencies.

    torch is left out of the check (it is installed from its pinned CPU wheel first); the others are
    in, because a release can conflict with them (transformers 5.0 needs huggingface-hub < 2).
    """
    others = [str(r) for r in dependencies() if r.name.lower() not in (name.lower(), "torch")]
    check = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             f"{name}=={version}", *others]
    return subprocess.run(check, capture_output=True, text=True).returncode == 0


def main() -> None:
    name, which = sys.argv[1], sys.argv[2]
    versions = released(name)
    allowed = [v for v in versions if declared(name).specifier.contains(v)]
    candidates = {"oldest": allowed, "newest": allowed[::-1], "next": versions[::-1]}[which]
    pick = next((v for v in candidates if installable(name, v)), None)
    if pick is None:
        raise SystemExit(f"no installable release of {name} satisfies {declared(name).specifier}")
    print(pick)


if __name__ == "__main__":
    main()
