"""The product's reference (docs/**/*.md) names every setting, command, option and trust key.

What is checked comes from the code, not from a list kept here: the fields of
`locator.config.Settings` (as their `LOCATOR_` environment variables), every command and
long option of the `locator` click group (walked recursively), and the keys the trusts-file
loader accepts (`locator.trusts._KNOWN_KEYS`). Any markdown file under docs/ counts, so a
capability may document its settings in a `docs/<feature>.md` of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import click
import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from locator.cli import main
from locator.config import Settings
from locator.trusts import _KNOWN_KEYS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def reference_text(docs: Path = DOCS) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(docs.rglob("*.md")))


# --------------------------------------------------------------------------- what must appear


def setting_variables(settings: type[BaseSettings]) -> list[str]:
    """The environment variable(s) of every field: prefix + NAME, or the field's alias."""
    prefix = str(settings.model_config.get("env_prefix") or "")
    names: list[str] = []
    for name, info in settings.model_fields.items():
        alias = info.validation_alias or info.alias
        if isinstance(alias, AliasChoices):
            names += [str(choice).upper() for choice in alias.choices if isinstance(choice, str)]
        elif isinstance(alias, str):
            names.append(alias.upper())
        else:
            names.append(f"{prefix}{name}".upper())
    return names


def cli_terms(group: click.Group, prefix: str = "locator") -> Iterator[str]:
    """`locator <command path>` for every command, and every long option of each."""
    yield from _long_flags(group)
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        yield path
        if isinstance(command, click.Group):
            yield from cli_terms(command, path)
        else:
            yield from _long_flags(command)


def _long_flags(command: click.Command) -> Iterator[str]:
    for param in command.params:
        if isinstance(param, click.Option):
            for flag in (*param.opts, *param.secondary_opts):
                if flag.startswith("--") and flag != "--help":
                    yield flag


# --------------------------------------------------------------------------- matching


def _pattern(term: str) -> re.Pattern[str]:
    """The term as a whole word: LOCATOR_MLLP_TLS does not count inside
    LOCATOR_MLLP_TLS_CERT, nor --dicom inside --dicom-host."""
    return re.compile(rf"(?<![A-Za-z0-9_-]){re.escape(term)}(?![A-Za-z0-9_-])")


def missing(terms: Iterable[str], text: str) -> list[str]:
    return sorted({t for t in terms if not _pattern(t).search(text)})


def missing_from_reference(
    text: str,
    *,
    settings: type[BaseSettings] = Settings,
    cli: click.Group = main,
    trust_keys: Iterable[str] = _KNOWN_KEYS,
) -> dict[str, list[str]]:
    found = {
        "settings (LOCATOR_ variables)": missing(setting_variables(settings), text),
        "commands and options": missing(cli_terms(cli), text),
        "trusts-file keys": missing(trust_keys, text),
    }
    return {what: terms for what, terms in found.items() if terms}


def describe(gaps: dict[str, list[str]]) -> str:
    lines = ["missing from docs/**/*.md (document each in docs/, see docs/README.md):"]
    lines += [f"  {what}: {', '.join(terms)}" for what, terms in gaps.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tests


def test_the_reference_names_every_setting_command_option_and_trust_key() -> None:
    gaps = missing_from_reference(reference_text())
    assert not gaps, describe(gaps)


def test_the_check_reports_what_the_text_does_not_name() -> None:
    """The check itself: a setting, command, option or key absent from the text is named."""

    class Extended(Settings):
        reference_probe_seconds: int = 1

    @click.group()
    def probe_cli() -> None:
        """A CLI with one command and one option the reference does not know."""

    @probe_cli.command("probe")
    @click.option("--probe-depth/--no-probe-depth")
    @click.option("--db")
    def probe(probe_depth: bool, db: str | None) -> None:
        """Nothing."""

    text = reference_text() + "\nlocator zzz --db\n"
    gaps = missing_from_reference(
        text, settings=Extended, cli=probe_cli, trust_keys=[*_KNOWN_KEYS, "probe_key"]
    )
    assert gaps == {
        "settings (LOCATOR_ variables)": ["LOCATOR_REFERENCE_PROBE_SECONDS"],
        "commands and options": ["--no-probe-depth", "--probe-depth", "locator probe"],
        "trusts-file keys": ["probe_key"],
    }
    assert "LOCATOR_REFERENCE_PROBE_SECONDS" in describe(gaps)
    # A longer name that contains the term does not count as naming it.
    assert missing(["LOCATOR_MLLP_TLS", "--dicom"], "LOCATOR_MLLP_TLS_CERT --dicom-host") == [
        "--dicom",
        "LOCATOR_MLLP_TLS",
    ]


def test_the_check_reads_every_markdown_file_under_docs(tmp_path: Path) -> None:
    (tmp_path / "feature").mkdir()
    (tmp_path / "a.md").write_text("LOCATOR_ONE\n", encoding="utf-8")
    (tmp_path / "feature" / "b.md").write_text("LOCATOR_TWO\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("LOCATOR_THREE\n", encoding="utf-8")
    text = reference_text(tmp_path)
    assert missing(["LOCATOR_ONE", "LOCATOR_TWO", "LOCATOR_THREE"], text) == ["LOCATOR_THREE"]


def test_the_readme_points_into_the_repository_not_outside_it() -> None:
    readme = README.read_text(encoding="utf-8")
    assert "shared/" not in readme, "the README points outside the repository"
    assert "docs/README.md" in readme


@pytest.mark.parametrize(
    "page", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_of_the_reference_resolves(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
