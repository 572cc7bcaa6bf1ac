"""The README is the map: under 200 lines, every page under docs/ linked from it, and every relative link of the
README and the docs pages names a file (and a heading) that exists."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').rglob('*.md'))]
LINK = re.compile(r'\]\(([^)\s]+)\)')


def anchors(page):
    """GitHub's anchors of a Markdown page's headings (outside code blocks)."""
    found, fence = set(), False
    for line in page.read_text().splitlines():
        fence ^= line.startswith('```')
        if not fence and line.startswith('#'):
            title = line.lstrip('#').strip().lower()
            found.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
    return found


def relative_links(page):
    return [link for link in LINK.findall(page.read_text()) if not re.match(r'[a-z]+://|mailto:', link)]


def test_the_readme_is_short_and_links_every_docs_page():
    readme = REPO / 'README.md'
    assert len(readme.read_text().splitlines()) < 200
    linked = {(readme.parent / link.split('#')[0]).resolve() for link in relative_links(readme)}
    missing = [str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f'docs pages the README does not link: {missing}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for link in relative_links(page):
        path, _, anchor = link.partition('#')
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f'{page.relative_to(REPO)} links {link}: no such file'
        if anchor and target.suffix == '.md':
            assert anchor in anchors(target), f'{page.relative_to(REPO)} links {link}: no such heading'
