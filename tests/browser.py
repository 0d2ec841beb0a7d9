"""Pages as a person sees them: Debian's chromium, headless, renders a URL and hands back its text."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("chromium not found: apt-get install -y chromium (.ci/run installs it)")
    return exe


def page_text(url: str, budget_ms: int = 15000) -> str:
    """The rendered page (after its scripts ran for `budget_ms` of virtual time) as visible text, one
    element's text per line; scripts and styles dropped."""
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no remembered UI state
        dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    lines = (html.unescape(t).strip() for t in re.split(r"<[^>]+>", dom))
    return "\n".join(t for t in lines if t)
