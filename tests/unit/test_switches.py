"""The switch table: one entry per environment variable that picks a path, read through the table, listed in the
README's "Environment switches" section and nowhere else."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from xportrait_core import switches

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NAME = re.compile(r"XPORTRAIT_[A-Z_]+")


def readme_switches_section(text: str) -> str:
    """The README's "Environment switches" section: from its heading to the next heading of the same or a higher
    level."""
    heading = re.search(r"^(#+)\s*Environment switches\s*$", text, flags=re.MULTILINE)
    if heading is None:
        pytest.fail("README.md has no 'Environment switches' section listing the switch table's names "
                    "(xportrait_core/switches.py)")
    level = len(heading.group(1))
    rest = text[heading.end():]
    following = re.search(rf"^#{{1,{level}}}\s", rest, flags=re.MULTILINE)
    return rest[: following.start()] if following else rest


def listed_switches(section: str) -> dict[str, list[str]]:
    """The switches a section's table lists: name (first cell) -> the backticked values of the second cell, in
    order (the README gives the default first). Prose around the table (path variables, say) is not a listing."""
    listed = {}
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for name in NAME.findall(cells[0]):
            listed[name] = re.findall(r"`([^`]+)`", cells[1]) if len(cells) > 1 else []
    return listed


def test_the_table_has_one_entry_per_name_each_with_a_default_among_its_choices_and_an_effect():
    names = [switch.name for switch in switches.SWITCHES]
    assert len(names) == len(set(names))
    assert names == ["XPORTRAIT_ATTENTION", "XPORTRAIT_CUDA_GRAPHS", "XPORTRAIT_FRAME_KERNEL",
                     "XPORTRAIT_GROUP_NORM_KERNEL", "XPORTRAIT_GEGLU_KERNEL",
                     "XPORTRAIT_LAYER_NORM_KERNEL", "XPORTRAIT_CONV_BIAS_KERNEL"]
    for switch in switches.SWITCHES:
        assert NAME.fullmatch(switch.name)
        assert switch.default in switch.choices
        assert len(switch.effect.split()) >= 8  # a sentence in words, not a name
        assert not re.search(r"\d+(\.\d+)?\s*(ms|s|GiB|GB|x)\b", switch.effect)  # no measured figures


def test_every_name_in_the_table_appears_in_the_readme():
    readme = README.read_text(encoding="utf-8")
    missing = [switch.name for switch in switches.SWITCHES if switch.name not in readme]
    assert missing == []


def test_the_readmes_environment_switches_section_lists_exactly_the_tables_names_values_and_defaults():
    listed = listed_switches(readme_switches_section(README.read_text(encoding="utf-8")))
    assert set(listed) == {switch.name for switch in switches.SWITCHES}
    for switch in switches.SWITCHES:
        values = listed[switch.name]
        assert values[:1] == [switch.default] and sorted(values) == sorted(switch.choices), (switch.name, values)


def test_the_section_reader_takes_the_table_rows_only():
    text = ("# Title\n\n## Environment switches\n\n| variable | values | effect |\n|---|---|---|\n"
            "| `XPORTRAIT_A` | `1`, `0` | a |\n| `XPORTRAIT_B` | `x`, `y` | b |\n\n"
            "Paths, not switches: `XPORTRAIT_PATH`.\n\n## Next\n\n| `XPORTRAIT_C` | `1` | c |\n")
    assert listed_switches(readme_switches_section(text)) == {"XPORTRAIT_A": ["1", "0"], "XPORTRAIT_B": ["x", "y"]}


def test_no_code_reads_a_switch_past_the_table():
    """Every `XPORTRAIT_*` switch name in the pack's code appears only where the table is read: no module reads
    such a variable from os.environ itself."""
    table_names = {switch.name for switch in switches.SWITCHES}
    direct = []
    for path in (ROOT / "xportrait_core").rglob("*.py"):
        if path == ROOT / "xportrait_core" / "switches.py":
            continue
        for match in re.finditer(r"os\.environ(?:\.get)?\s*[\[(]\s*[\"'](XPORTRAIT_[A-Z_]+)", path.read_text()):
            if match.group(1) in table_names:
                direct.append((path.name, match.group(1)))
    assert direct == []


def test_on_off_switches_are_on_unless_turned_off(monkeypatch):
    for value, on in (("", True), ("1", True), ("yes", True), ("0", False), ("Off", False), (" no ", False),
                      ("FALSE", False)):
        monkeypatch.setenv("XPORTRAIT_GEGLU_KERNEL", value)
        assert switches.switched_on("XPORTRAIT_GEGLU_KERNEL") is on, value
    monkeypatch.delenv("XPORTRAIT_GEGLU_KERNEL")
    assert switches.switched_on("XPORTRAIT_GEGLU_KERNEL")


def test_a_choice_switch_takes_its_choices_only(monkeypatch):
    monkeypatch.delenv("XPORTRAIT_ATTENTION", raising=False)
    assert switches.setting("XPORTRAIT_ATTENTION") == "auto"
    monkeypatch.setenv("XPORTRAIT_ATTENTION", " SDPA ")
    assert switches.setting("XPORTRAIT_ATTENTION") == "sdpa"
    monkeypatch.setenv("XPORTRAIT_ATTENTION", "flash3")
    with pytest.raises(ValueError, match="XPORTRAIT_ATTENTION='flash3': expected one of auto, xformers, sdpa, math"):
        switches.setting("XPORTRAIT_ATTENTION")
    with pytest.raises(ValueError, match="not an on/off switch"):
        switches.switched_on("XPORTRAIT_ATTENTION")
