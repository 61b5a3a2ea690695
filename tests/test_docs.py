"""The README and docs/ stay true: every relative link resolves (file and heading), and every `--set KEY=...`
they show is a field of the config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from tasks.config import PipelineConfig
from tests.support import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SET = re.compile(r"--set\s+'?([a-z_][\w.]*)=")  # lower case: KEY=VALUE is a placeholder


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def config_path_exists(dotted: str) -> bool:
    model: type[BaseModel] = PipelineConfig
    for i, key in enumerate(dotted.split(".")):
        field = model.model_fields.get(key)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i < len(dotted.split(".")) - 1:
            return False
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_to_files_and_headings(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert broken == []


def test_every_set_shown_is_a_config_field() -> None:
    shown = {(doc.relative_to(REPO).as_posix(), key) for doc in DOCS for key in SET.findall(doc.read_text())}
    assert len(shown) > 20  # the docs show many
    assert [f"{doc}: --set {key}" for doc, key in sorted(shown) if not config_path_exists(key)] == []


def test_the_readme_is_a_map_not_the_manual() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")}  # every document is on the map
