"""Opens an HTML page in headless Chromium and reports how many of its images rendered.

Used by the report tests: a page counts as rendered when every ``<img>`` has decoded
(``naturalWidth > 0``). The page is copied with a small probe script that writes the counts
into ``<body data-images data-loaded>`` on the load event; ``--dump-dom`` prints the DOM after
the virtual time budget, so the probe has run. No network: the pages are self-contained and
Chromium is started with background networking off.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

_PROBE = """<script>window.addEventListener('load', function () {
var imgs = Array.prototype.slice.call(document.images);
var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
document.body.setAttribute('data-images', imgs.length);
document.body.setAttribute('data-loaded', ok);
});</script>"""


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def rendered_images(html_path: str, work_dir: str) -> tuple[int, int]:
    """``(images, loaded)`` of a page opened in headless Chromium."""
    with open(html_path, encoding="utf-8") as f:
        text = f.read()
    assert "</body>" in text, f"{html_path} has no </body>"
    probe_path = os.path.join(work_dir, "probe.html")
    with open(probe_path, "w", encoding="utf-8") as f:
        f.write(text.replace("</body>", _PROBE + "</body>"))
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={os.path.join(work_dir, 'chromium-profile')}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        "file://" + os.path.abspath(probe_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-loaded="(\d+)"', proc.stdout)
    assert match, f"no probe result from Chromium (rc {proc.returncode}): {proc.stderr[-1500:]}"
    return int(match.group(1)), int(match.group(2))
