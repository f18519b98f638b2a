"""The book as readers see it: Sphinx builds it with warnings as errors, then headless Chromium opens
every page through a local web server and checks links, images and the Colab buttons.

The book is built once per test session with notebook execution off (the pages show code without
outputs): executed output is covered by nbval in `make test`, which runs every notebook, and by
`make book`, which builds with every notebook executed and warnings as errors. The browser is
Debian's `chromium` with `chromium-driver` (`make browser` installs them, `make test` runs it), driven
by Selenium; without them the browser tests skip, except under `CI=true`, where they fail.
Screenshots of the intro and of one chapter land in `test-artifacts/`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path(os.environ.get("CELLSEG_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CELLSEG_CHROMEDRIVER", "/usr/bin/chromedriver"))
# Headless, offline and quiet: no GPU, no QUIC, no first-run, update, sync or background traffic.
# Every host but 127.0.0.1 fails to resolve, so CDN scripts fail fast and identically everywhere.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
# What a page holds, read in the browser after it loaded (URLs resolved against the page).
COLLECT_JS = """
const abs = u => new URL(u, document.baseURI).href;
const srcset = s => (s || "").split(",").map(p => p.trim().split(/\\s+/)[0]).filter(Boolean).map(abs);
return {
  title: document.title,
  ids: Array.from(document.querySelectorAll("[id]"), e => e.id)
    .concat(Array.from(document.querySelectorAll("a[name]"), e => e.name)),
  links: Array.from(document.querySelectorAll("a[href]"), a => a.href),
  images: Array.from(document.images,
    i => ({src: i.currentSrc || i.src, width: i.naturalWidth, complete: i.complete})),
  srcsets: Array.from(document.querySelectorAll("img[srcset], source[srcset]"),
    e => srcset(e.getAttribute("srcset"))).flat(),
};
"""


def _browser_missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so the browser test may not skip (run `make browser`)")
    pytest.skip(f"{reason} (install it with `make browser`, as root on Debian)")


# ---------------------------------------------------------------------------------------------
# the build, once per session


@dataclass
class Build:
    result: subprocess.CompletedProcess
    html: Path
    seconds: float


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Build:
    """`jupyter-book build -W -n --keep-going` into a temporary folder, with execution off unless
    ``CELLSEG_BOOK_EXECUTE=1`` (then every notebook runs, as in `make book`, and the browser checks
    see their figures: the notebooks' run time again)."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    if not jupyter_book.exists():
        pytest.skip("jupyter-book is not installed (install the [book] extra)")
    out = tmp_path_factory.mktemp("book")
    config = (REPO / "_config.yml").read_text()
    assert "execute_notebooks: force" in config
    if os.environ.get("CELLSEG_BOOK_EXECUTE") != "1":
        config = config.replace("execute_notebooks: force", "execute_notebooks: 'off'")
    (out / "_config.yml").write_text(config)
    command = [str(jupyter_book), "build", str(REPO), "--config", str(out / "_config.yml")]
    command += ["--path-output", str(out), "-W", "-n", "--keep-going"]
    start = time.perf_counter()
    env = {**os.environ, "CELLSEG_FAST": os.environ.get("CELLSEG_FAST", "1")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    yield Build(result, out / "_build" / "html", time.perf_counter() - start)
    shutil.rmtree(out / "_build", ignore_errors=True)


@pytest.fixture(scope="session")
def html(build) -> Path:
    if not (build.html / "book" / "intro.html").is_file():
        pytest.fail("the build left no HTML:\n" + build.result.stdout[-3000:] + build.result.stderr)
    return build.html


def test_book_builds_with_warnings_as_errors(build):
    log = build.result.stdout[-3000:] + build.result.stderr[-3000:]
    assert build.result.returncode == 0, log


def test_every_notebook_has_a_page_with_a_colab_link(html):
    pages = {p.relative_to(html).as_posix() for p in html.rglob("*.html")}
    for notebook in NOTEBOOKS:
        page = f"notebooks/{notebook.stem}.html"
        assert page in pages, f"{page} was not built"
        assert "colab.research.google.com" in (html / page).read_text(), f"no Colab link on {page}"


def test_references_page_cites_the_paper(html):
    references = (html / "book" / "references.html").read_text().lower()
    assert "multi-stream cell segmentation with low-level cues" in references


# ---------------------------------------------------------------------------------------------
# a local web server and headless Chromium


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # the browser drops connections it no longer needs (a cancelled prefetch): not an error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder and records every request's path and status."""

    def log_request(self, code="-", size="-"):
        self.server.requests.append((unquote(urlsplit(self.path).path), int(code)))

    def log_message(self, format, *args):
        pass


@dataclass
class Page:
    path: str  # relative to the site root, e.g. "book/intro.html"
    status: int | None
    title: str
    ids: set[str]
    links: list[str]
    images: list[dict]
    srcsets: list[str]
    errors: list[str]


@dataclass
class Site:
    html: Path
    base: str  # "http://127.0.0.1:PORT/"
    pages: dict[str, Page]
    requests: list[tuple[str, int]]
    landing: str | None  # where the site root ("/") led, when asked
    seconds: float


def _our_errors(entries: list[dict], base: str) -> list[str]:
    """Severe console entries of our own making. Not ours: failed requests to outside hosts (all
    unresolvable here), errors raised by outside scripts, the favicon.ico the browser asks for
    unbidden, and the upstream faults listed in KNOWN_UPSTREAM."""
    ours = []
    for entry in entries:
        message = entry["message"]
        if entry.get("level") != "SEVERE" or message.startswith(f"{base}favicon.ico "):
            continue
        urls = re.findall(r"[a-z]+://[^\s\"']+", message)
        if urls and not urls[0].startswith(base):
            continue
        if not any(known in message for known in KNOWN_UPSTREAM):
            ours.append(message)
    return ours


# Console errors that are not ours and cannot be fixed from this repository, with the reason.
KNOWN_UPSTREAM = {
    "Identifier 'THEBE_JS_URL' has already been declared": (
        "Sphinx 7.4 writes inline scripts that extensions add after the builder started twice"
        " (sphinx-doc/sphinx pull request 13402, fixed in Sphinx 8; Jupyter Book 1 needs Sphinx 7);"
        " sphinx-thebe's second copy fails, the first one has defined the same constants"
    ),
}


# How to fix console errors seen before.
HINTS = {
    "Got invalid theme mode": (
        " (pydata-sphinx-theme on a first visit when no default colour mode is set: add"
        " `html_context: {default_mode: auto}` under `sphinx: config:` in _config.yml)"
    ),
}


def _crawl(html: Path, paths: list[str], screenshots: dict[str, Path], root: bool = False) -> Site:
    """Serve ``html`` on 127.0.0.1 (a free port) and open each of ``paths`` once in headless
    Chromium, saving a screenshot of the pages named in ``screenshots``; with ``root``, also follow
    the site root's redirect."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        _browser_missing("selenium is not installed (install the [test] extra)")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            _browser_missing(f"{binary} not found")

    server = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(html)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    profile = tempfile.mkdtemp(prefix="cellseg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit chromedriver: Selenium Manager never runs (and never downloads anything)
    service = Service(str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
    driver, pages, landing = None, {}, None
    start = time.perf_counter()
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(120)
        wait = WebDriverWait(driver, 60)
        for path in paths:
            before = len(server.requests)
            driver.get(base + path)
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
            # lazy images load only near the viewport: ask for all of them, then wait for each
            driver.execute_script(
                "document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')"
            )
            wait.until(
                lambda d: d.execute_script(
                    "return Array.from(document.images).every(i => i.complete)"
                )
            )
            data = driver.execute_script(COLLECT_JS)
            status = next((s for p, s in server.requests[before:] if p == f"/{path}"), None)
            pages[path] = Page(
                path=path,
                status=status,
                title=data["title"],
                ids=set(data["ids"]),
                links=data["links"],
                images=data["images"],
                srcsets=data["srcsets"],
                errors=_our_errors(driver.get_log("browser"), base),
            )
            if path in screenshots:
                screenshots[path].parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(screenshots[path]))
        if root:
            driver.get(base)
            wait.until(lambda d: d.current_url not in (base, base + "index.html"))
            landing = driver.current_url
    finally:
        if driver is not None:
            driver.quit()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    return Site(html, base, pages, list(server.requests), landing, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# the checks, on what the browser saw


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k == "id" or (tag == "a" and k == "name"))


def _ids_of(site: Site, path: str) -> set[str]:
    if path in site.pages:
        return site.pages[path].ids
    parser = _Ids()
    parser.feed((site.html / path).read_text(errors="replace"))
    return parser.ids


def _local_target(site: Site, url: str) -> tuple[str, str] | None:
    """(path relative to the site root, fragment) for a URL inside the site, else None."""
    if not url.startswith(site.base):
        return None
    parts = urlsplit(url)
    path = unquote(parts.path).lstrip("/")
    if path == "" or path.endswith("/") or (site.html / path).is_dir():
        path = (path.rstrip("/") + "/index.html").lstrip("/")
    return path, unquote(parts.fragment)


def page_problems(site: Site) -> list[str]:
    """Pages that did not answer 200, have no title or logged errors of ours, and local requests
    that failed (a missing stylesheet, script, font or image)."""
    problems = []
    for page in site.pages.values():
        if page.status != 200:
            problems.append(f"{page.path}: HTTP {page.status}")
        if not page.title.strip():
            problems.append(f"{page.path}: no title")
        for error in page.errors:
            hint = next((h for key, h in HINTS.items() if key in error), "")
            problems.append(f"{page.path}: console error: {error}{hint}")
    # favicon.ico: the browser asks for it unbidden; no page links one
    failed = sorted({(p, s) for p, s in site.requests if s >= 400 and p != "/favicon.ico"})
    return problems + [f"request failed: {path} (HTTP {status})" for path, status in failed]


def broken_links(site: Site) -> list[str]:
    """Every ``<a href>``, ``<img src>`` and ``srcset`` inside the site whose file is missing, or
    whose ``#fragment`` names no element of its page."""
    broken = []
    for page in site.pages.values():
        images = [image["src"] for image in page.images]
        for url in dict.fromkeys(page.links + images + page.srcsets):
            target = _local_target(site, url)
            if target is None:
                continue
            path, fragment = target
            if not (site.html / path).is_file():
                broken.append(f"{page.path} -> {url} (no such file)")
            elif fragment and path.endswith(".html") and fragment not in _ids_of(site, path):
                broken.append(f"{page.path} -> {url} (no #{fragment} there)")
    return broken


def missing_images(site: Site) -> list[str]:
    """Local images the browser could not show (not loaded, or zero natural width)."""
    return [
        f"{page.path}: {image['src']}"
        for page in site.pages.values()
        for image in page.images
        if image["src"].startswith(site.base) and not (image["complete"] and image["width"] > 0)
    ]


def _site_pages(html: Path) -> list[str]:
    """Every HTML page of the site but the root's redirect (followed on its own)."""
    skip = ("_static/", "_sources/", "_images/")
    pages = [p.relative_to(html).as_posix() for p in sorted(html.rglob("*.html"))]
    return [p for p in pages if p != "index.html" and not p.startswith(skip)]


SCREENSHOTS = {"book/intro.html": ARTIFACTS / "site-intro.png"}
if NOTEBOOKS:  # one chapter: the first after the setup chapter
    _chapter = NOTEBOOKS[min(1, len(NOTEBOOKS) - 1)].stem
    SCREENSHOTS[f"notebooks/{_chapter}.html"] = ARTIFACTS / f"site-{_chapter}.png"


@pytest.fixture(scope="session")
def site(html) -> Site:
    """The built book, every page visited once in Chromium."""
    return _crawl(html, _site_pages(html), SCREENSHOTS, root=True)


@pytest.mark.network
def test_every_page_loads_without_errors(site):
    assert len(site.pages) >= len(NOTEBOOKS) + 2, sorted(site.pages)
    problems = page_problems(site)
    assert not problems, "\n".join(problems)
    assert site.landing == site.base + "book/intro.html", f"the site root led to {site.landing}"


@pytest.mark.network
def test_no_broken_internal_links(site):
    broken = broken_links(site)
    assert not broken, "\n".join(broken)
    links = sum(len(page.links) for page in site.pages.values())
    assert links > 10 * len(site.pages), f"only {links} links on {len(site.pages)} pages"


@pytest.mark.network
def test_no_missing_images(site):
    missing = missing_images(site)
    assert not missing, "\n".join(missing)


@pytest.mark.network
def test_colab_button_on_every_notebook_page(site):
    config = (REPO / "_config.yml").read_text()
    url = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", config, flags=re.M).group(1)
    branch = re.search(r"^repository:\s*\n(?:\s+\S.*\n)*?\s+branch:\s*(\S+)", config, flags=re.M)
    repository = urlsplit(url).path.strip("/")
    for notebook in NOTEBOOKS:
        page = site.pages[f"notebooks/{notebook.stem}.html"]
        wanted = (
            f"https://colab.research.google.com/github/{repository}/blob/{branch.group(1)}/"
            f"notebooks/{notebook.name}"
        )
        colab = [link for link in page.links if "colab.research.google.com" in link]
        assert wanted in colab, f"{page.path}: Colab links {colab}, wanted {wanted}"


@pytest.mark.network
def test_screenshots_show_the_pages(site):
    from PIL import Image

    for path, png in SCREENSHOTS.items():
        assert png.is_file(), f"no screenshot of {path}"
        assert png.stat().st_mtime >= time.time() - site.seconds - 60, f"{png} is stale"
        with Image.open(png) as image:
            assert image.size[0] >= 1000, image.size
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        # a blank or error page has a handful of colours; anti-aliased text has hundreds
        assert colours is None or len(colours) > 50, f"{png.name} looks empty"


@pytest.mark.network
def test_the_checks_find_what_is_broken(tmp_path):
    """The checks themselves, on a two-page site with one fault of each kind."""
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "b.html").write_text('<title>b</title><h1 id="there">b</h1>')
    (tmp_path / "a.html").write_text(
        "<title>a</title>"
        '<a href="b.html#there">fine</a> <a href="b.html#gone">gone fragment</a>'
        '<a href="c.html">missing page</a> <a href="https://example.org/x">outside</a>'
        '<img src="ok.png"> <img src="nope.png"> <img src="ok.png" srcset="ok.png 1x, big.png 2x">'
        '<script src="https://cdn.example.org/lib.js"></script>'
        "<script>undefinedFunction()</script>"
    )
    site = _crawl(tmp_path, ["a.html", "b.html"], {})
    problems = "\n".join(page_problems(site))
    assert "undefinedFunction" in problems and "cdn.example.org" not in problems, problems
    assert "request failed: /nope.png (HTTP 404)" in problems, problems
    broken = broken_links(site)
    assert sorted(url.split(" -> ")[1].split()[0].rsplit("/", 1)[1] for url in broken) == [
        "b.html#gone",
        "big.png",
        "c.html",
        "nope.png",
    ], broken
    assert [m.rsplit("/", 1)[1] for m in missing_images(site)] == ["nope.png"]
