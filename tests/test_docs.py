"""The README and docs/ pages: links resolve, generated blocks sit where their generators write, headline numbers
come from the records they link to."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    """Relative links and images of `page` whose file (or #anchor in it) does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    return broken


def block(page: Path, name: str) -> str:
    """The text between `<!-- results:name -->` and `<!-- /results:name -->`, which must each occur once, in order."""
    text = page.read_text()
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"{page}: needs {start} and {end} once each"
    assert text.index(start) < text.index(end), f"{page}: {end} before {start}"
    return text.split(start)[1].split(end)[0].strip()


def study_configs() -> list[tuple[Path, dict]]:
    yaml = pytest.importorskip("yaml")
    configs = [(path, yaml.safe_load(path.read_text())) for path in sorted(REPO.glob("configs/experiments/*.yaml"))]
    return [(path, config) for path, config in configs if "readme" in config]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_images_resolve(page):
    assert broken_links(page) == []


def test_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A section: with, punctuation\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-section-with-punctuation) [ok](#here) ![gone](img.png) [bad](other.md#nope)\n"
        "```\n[inside a code block](ignored.md)\n```\n## Here\n"
    )
    assert broken_links(page) == ["img.png", "other.md#nope"]


def test_readme_fits_on_a_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_every_study_config_pastes_into_an_existing_block_that_holds_its_exported_table():
    configs = study_configs()
    assert {config["readme_marker"] for _, config in configs} >= {"sms_spam", "sms_spam_example", "rotten_tomatoes"}
    for path, config in configs:
        page = REPO / config["readme"]
        exported = REPO / config["export_dir"] / "results.md"
        assert block(page, config["readme_marker"]) == exported.read_text().strip(), path.name


def test_demo_block_holds_the_exported_demo_table():
    assert block(REPO / "docs/studies.md", "demo") == (REPO / "docs/results/demo/results.md").read_text().strip()


def test_make_bench_pastes_into_the_page_that_holds_the_generated_performance_table():
    (target,) = re.findall(r"-m benchmarks\.report --readme (\S+)", (REPO / "Makefile").read_text())
    generated = (REPO / "benchmarks/results/README_table.md").read_text().strip()
    assert block(REPO / target, "performance") == generated


def test_block_check_fails_on_a_missing_or_reversed_marker(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- /results:x -->\n<!-- results:x -->\n")
    with pytest.raises(AssertionError):
        block(page, "x")
    with pytest.raises(AssertionError):
        block(page, "y")


def test_readme_headline_numbers_appear_in_the_pages_each_bullet_links_to():
    results = (REPO / "README.md").read_text().split("\n## Results\n")[1].split("\n## ")[0]
    bullets = re.split(r"\n- ", results)[1:]
    assert len(bullets) >= 3
    for bullet in bullets:
        sources = "\n".join((REPO / target.partition("#")[0]).read_text() for target in LINK.findall(bullet))
        assert sources, bullet
        missing = [number for number in DECIMAL.findall(bullet) if number not in sources]
        assert missing == [], bullet
