"""report.html of a real tiny run, opened in headless Chromium: every image decodes, the page opens with the
answer (before -> after figures, then plots, then tables with their column notes folded), the side-by-side
section holds every held-out prompt, its filter hides the unchanged ones, nothing logs an error, and without
JavaScript every prompt still shows. The screenshot stays under the run's report/ for people to look at.

Chromium comes from Debian's package (`apt-get install chromium`); `.ci/run` installs it and sets
LORA_CAI_REQUIRE_BROWSER=1, so in CI this test fails rather than skips when the browser cannot run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from browser import Browser, chromium_path
from conftest import run_cli, write_recipe


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory) -> Path:
    if chromium_path() is None:
        if os.environ.get("LORA_CAI_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed: apt-get update && apt-get install -y chromium")
        pytest.skip("no chromium here (apt-get install chromium); CI installs it and requires this test")
    root = tmp_path_factory.mktemp("browser")
    recipe = write_recipe(root / "r.yaml", tiny_model, root / "run",
                          eval="{early_stop_drop: null, capability_limit: 8, per_principle: true}")
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "run"
    # One held-out prompt answered the same by every policy, so the filter has something to hide: round 1's and
    # round 2's answer (and verdict) to the first harmful prompt set back to the base model's.
    base = json.loads((run / "baseline-eval.json").read_text())["samples"][0]
    for k in (1, 2):
        path = run / f"round-{k}" / "eval.json"
        ev = json.loads(path.read_text())
        same = next(s for s in ev["samples"] if (s["set"], s["id"]) == (base["set"], base["id"]))
        same.update(answer=base["answer"], refusal=base["refusal"])
        path.write_text(json.dumps(ev))
    from lora_cai.report.build import build_report

    build_report(run)
    return run


def test_the_report_reads_in_a_real_browser(report):
    samples = json.loads((report / "baseline-eval.json").read_text())["samples"]
    with Browser() as b:
        b.open((report / "report.html").resolve().as_uri())
        images = b.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert len(images) == 6 and all(ok for _, ok in images), images
        # The per-principle heatmap (principles x rounds), beside its table: decoded, its pixels read back through a
        # canvas. 17 principles and 2 rounds make a 480 x 766 figure; its cells are coloured (not grey, not white).
        heat = "Array.from(document.images).find(i => i.alt.startsWith('Per-principle effects'))"
        assert b.evaluate(f"[{heat}.naturalWidth, {heat}.naturalHeight]") == [480, 766]
        coloured = b.evaluate(f"""(() => {{ const img = {heat}, c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight; const x = c.getContext('2d');
            x.drawImage(img, 0, 0); const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) {{ const m = Math.max(d[i], d[i+1], d[i+2]),
              l = Math.min(d[i], d[i+1], d[i+2]); if (m - l > 60) n += 1; }} return n / (c.width * c.height); }})()""")
        assert coloured > 0.2, coloured
        table = b.evaluate(f"""(() => {{ const t = {heat}.closest('.beside').querySelector('table');
            return [Array.from(t.querySelectorAll('th')).map(h => h.textContent), t.querySelectorAll('tbody tr').length];
            }})()""")
        assert table == [["principle", "round 1", "round 2"], 17]
        order = b.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        assert order[:3] == ["Plots", "Answers side by side", "The run"] and "Rounds" in order
        assert b.evaluate("document.querySelector('.summary') !== null && document.querySelector('.summary')"
                          ".compareDocumentPosition(document.images[0]) === Node.DOCUMENT_POSITION_FOLLOWING")
        figures = b.evaluate("Array.from(document.querySelectorAll('.fig .label')).map(x => x.textContent)")
        assert figures[:2] == ["harmful compliance (held out)", "over-refusal (held out)"]
        assert b.evaluate("document.querySelectorAll('details.note').length") >= 6
        assert not b.evaluate("document.querySelector('details.note').open")  # column notes folded

        rows = b.evaluate("document.querySelectorAll('tr.cmp').length")
        assert rows == len(samples)
        unchanged = b.evaluate("document.querySelectorAll('tr.cmp[data-changed=\"0\"]').length")
        assert unchanged >= 1
        visible = "Array.from(document.querySelectorAll('tr.cmp')).filter(r => r.offsetParent !== null).length"
        assert b.evaluate(visible) == rows
        b.evaluate("document.getElementById('only-changed').click()")
        assert b.evaluate(visible) == rows - unchanged
        assert b.evaluate("document.getElementById('shown').textContent") == f"{rows - unchanged} of {rows} prompts shown"
        b.evaluate("document.getElementById('only-changed').click()")
        assert b.evaluate(visible) == rows
        verdicts = b.evaluate("Array.from(document.querySelectorAll('tr.cmp .verdict')).map(v => v.textContent)")
        assert all(v.split(" · ")[0] in ("refused", "answered", "n/a") for v in verdicts)
        assert any("vs previous: " in v and "n/a" not in v.split(" · ")[1] for v in verdicts)  # stored per answer
        assert b.errors() == []
        shot = report / "report" / "screenshot.png"
        shot.write_bytes(b.screenshot())
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

        b.call("Emulation.setScriptExecutionDisabled", {"value": True})  # JavaScript off: everything shows
        b.open((report / "report.html").resolve().as_uri())
        assert b.evaluate(visible) == rows and b.evaluate("document.getElementById('shown').textContent") == ""
    html = (report / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained: nothing fetched from anywhere
