"""Print the lowest versions pyproject.toml allows, one `name==version` a line, for `pip install`: the
dependencies and the extras named on the command line. `--instead torch==2.13.0` puts that requirement in place
of a package's floor (`python3 .ci/floors.py dev serve --instead torch==2.13.0`)."""

import argparse
import re
from pathlib import Path

import tomllib

parser = argparse.ArgumentParser()
parser.add_argument("extras", nargs="*")
parser.add_argument("--instead", action="append", default=[], metavar="NAME==VERSION")
args = parser.parse_args()
instead = {re.split(r"[=<>!~ ]", r, maxsplit=1)[0].lower(): r for r in args.instead}

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in args.extras:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*(,.*)?", requirement)
    name = match.group(1) if match else re.split(r"[=<>!~ ;\[]", requirement.strip(), maxsplit=1)[0]
    if name.lower() in instead:
        print(instead[name.lower()])
    elif match:
        print(f"{name}=={match.group(2)}")
    else:  # no lower bound: as pip resolves it
        print(requirement.strip())
