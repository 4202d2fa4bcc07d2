"""Headless Chromium for the page tests: find the browser, open a page from disk with the network blocked, and hand
back what a reader's browser made of it — the DOM after the page's scripts ran, and every console message.

Why Chromium's own command line and no driver (Selenium, Playwright): ``--dump-dom`` prints the live DOM after the
scripts ran (``--virtual-time-budget`` lets the page's timers and promises finish first, without waiting in real
time), and ``--enable-logging=stderr`` prints each console message, uncaught exceptions included, as a
``CONSOLE`` line on stderr. That is all these tests need, and it needs nothing beyond the browser itself: no driver
binary matched to the browser's version, no browser download (Playwright's CDN is not reachable from every machine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

# Debian's package, Ubuntu's and other distributions' name for it, then Google's build (preinstalled on GitHub's
# Ubuntu runners). $CHROMIUM names another binary.
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# One console message on stderr, e.g. ``[..:INFO:CONSOLE:68] "Uncaught ReferenceError: ...", source: file:///... (68)``
# (older Chromium writes ``CONSOLE(68)``).
CONSOLE_LINE = re.compile(r":CONSOLE[(:]\d*\)?\] (.*)$")

# Elements the HTML serializer writes without an end tag.
VOID_ELEMENTS = frozenset("area base br col embed hr img input link meta source track wbr".split())


def running_in_ci() -> bool:
    """True where the CI environment variable says so (GitHub Actions, GitLab and most others set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_chromium() -> str | None:
    """The path of a Chromium-family browser: $CHROMIUM if set, else the first of BROWSER_NAMES on PATH."""
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named)
    return next((path for path in map(shutil.which, BROWSER_NAMES) if path), None)


def chromium_or_skip() -> str:
    """The browser for a ``browser`` test. Without one, skip with the reason on a local run, but fail under CI, so
    that a CI machine missing the browser cannot pass by skipping every page test."""
    path = find_chromium()
    if path:
        return path
    reason = (f"no headless Chromium found (looked for $CHROMIUM and {', '.join(BROWSER_NAMES)}); "
              "install one, e.g. `apt-get install chromium`")
    if running_in_ci():
        pytest.fail(f"CI is set: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class RenderedPage:
    """What the browser made of a page: the DOM after its scripts ran, and its console messages in order."""

    dom: str
    console: tuple[str, ...]


def render(browser: str, page: Path, *, script_time_ms: int = 10_000, timeout_s: float = 120) -> RenderedPage:
    """Open `page` from disk in headless `browser` with no network, let its scripts run for `script_time_ms` of
    virtual time, and return the DOM and console messages."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            browser, "--headless", "--disable-gpu",
            # The sandbox needs user namespaces, which containers and root lack; the pages are our own local files.
            "--no-sandbox", "--disable-dev-shm-usage",
            # No network: every host name fails to resolve, and anything else would go to a proxy that is not there.
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
            f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--enable-logging=stderr", "--v=0",
            f"--virtual-time-budget={script_time_ms}", "--window-size=1400,1000",
            "--dump-dom", page.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0 or "<html" not in done.stdout:
        raise RuntimeError(f"{browser} exited with {done.returncode} on {page}:\n{done.stderr[-3000:]}")
    console = tuple(m.group(1) for m in map(CONSOLE_LINE.search, done.stderr.splitlines()) if m)
    return RenderedPage(dom=done.stdout, console=console)


@dataclass
class Element:
    """One element of a parsed DOM: its tag, attributes, and content (child elements and text, in order)."""

    tag: str
    attrs: dict[str, str]
    content: list[Element | str]

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for child in self.content:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        """Descendants (self included) with this tag and/or class, in document order."""
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)]

    def text(self) -> str:
        """The text a reader sees in it, whitespace collapsed."""
        return " ".join("".join(c if isinstance(c, str) else c.text() + " " for c in self.content).split())


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, [])
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, [])
        self.open[-1].content.append(element)
        if tag not in VOID_ELEMENTS:
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.open[-1].content.append(Element(tag, {k: v or "" for k, v in attrs}, []))

    def handle_endtag(self, tag):
        # close up to the matching open element (the serializer's output is well nested; this only guards)
        for depth in range(len(self.open) - 1, 0, -1):
            if self.open[depth].tag == tag:
                del self.open[depth:]
                return

    def handle_data(self, data):
        self.open[-1].content.append(data)


def parse_dom(html: str) -> Element:
    """The element tree of a serialized DOM (as ``--dump-dom`` prints it)."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def table_rows(table: Element) -> list[list[str]]:
    """The text of each cell, row by row (header rows included)."""
    return [[cell.text() for cell in row.content if isinstance(cell, Element) and cell.tag in ("td", "th")]
            for row in table.find_all("tr")]
