"""Every relative link in README.md and docs/*.md resolves: the file exists and, for `page.md#anchor`,
the page has a heading with that anchor (GitHub's rule: lower case, punctuation dropped, spaces to
hyphens). External (http) links are not fetched: the tests run offline."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path):
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    slugs = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def links(path):
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+://|mailto:", target)]


def test_anchor_rule():
    assert "the-override-and-how-to-turn-it-off" in {
        re.sub(r"[^\w\- ]", "", "The override, and how to turn it off".lower()).replace(" ", "-")
    }


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "docs")), reason="needs the source tree")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(resolved):
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading '#{anchor}' in {os.path.relpath(resolved, REPO)})")
    assert not broken, f"{os.path.relpath(page, REPO)}: " + "; ".join(broken)


def test_metafile_readme_exists():
    metafile = os.path.join(REPO, "configs", "dcnv2", "metafile.yml")
    if not os.path.exists(metafile):
        pytest.skip("needs the source tree")
    for target in re.findall(r"README:\s*(\S+)", open(metafile, encoding="utf-8").read()):
        assert os.path.exists(os.path.join(REPO, target)), f"metafile.yml names a missing README: {target}"
