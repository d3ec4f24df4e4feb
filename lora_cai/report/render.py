"""Blocks rendered as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lora_cai.report.blocks import COMPARE_MD_ROWS, _truncate, refusal_label, win_label
from lora_cai.report.plots import TITLES
from lora_cai.report.tables import NA


def _md_cell(text: str) -> str:
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
            .replace("\n", " ↵ ").replace("<", "&lt;").replace(">", "&gt;"))


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "list":
            out.append("\n".join(f"- {_md_cell(x)}" for x in blk[1]))
        elif kind == "table":
            _, headers, rows = blk
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{TITLES[blk[1]]}](report/{blk[1]})")
        elif kind == "beside":  # an image and the table it draws
            _, name, headers, rows = blk
            out.append(f"![{TITLES[name]}](report/{name})")
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "note":
            out.append(f"*What the columns mean:* {blk[1]}")
        elif kind == "summary":
            _, figures, lines = blk
            table = ["| held out | base | final policy | change |", "|---|---|---|---|"]
            table += [f"| {label} | {before} | {after} | {change} |" for label, before, after, change in figures]
            out.append("\n".join(table))
            out.append("\n".join(f"- {_md_cell(x)}" for x in lines))
        elif kind == "compare":
            _, policies, groups = blk
            for title, rows in groups:
                changed = [r for r in rows if r["changed"]]
                shown = (changed + [r for r in rows if not r["changed"]])[:COMPARE_MD_ROWS]
                out.append(f"### {title} ({len(rows)}, {len(changed)} changed)")
                head = ["prompt"] + ["base" if k == 0 else f"round {k}" for k in policies]
                lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                for r in shown:
                    cells = [_md_cell(_truncate(r["prompt"], 120))]
                    for k in policies:
                        c = r["cells"].get(k, {})
                        cells.append(_md_cell(f"{refusal_label(c)}: {_truncate(c.get('answer'), 120)}"))
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines))
                if len(rows) > len(shown):
                    out.append(f"{len(rows) - len(shown)} more in report.html (changed prompts first here).")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}th{background:#f3f3f3}td{white-space:pre-wrap}img{max-width:100%;display:block;margin:1em 0}
.summary{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0}.fig{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;
min-width:14em}.fig .label{color:#555}.fig .big{font-size:2em;font-weight:600}.fig .change{font-size:.85em;color:#444}
details.note{margin:.5em 0;color:#444;font-size:.9em}details.note summary{cursor:pointer}
table.compare td{width:1%}table.compare .verdict{font-weight:600;font-size:.85em;color:#333;white-space:normal}
.filter{margin:.5em 0}@media print{.filter{display:none}details.note>p{display:block}}
.beside{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.beside img{margin:1em 0;max-width:min(100%,520px)}"""
# The side-by-side filter: a few lines of inline JavaScript, no library, no network. Without JavaScript every
# prompt shows; printing opens the column notes.
_SCRIPT = """<script>
(function () {
  var box = document.getElementById("only-changed"), count = document.getElementById("shown");
  function apply() {
    var rows = document.querySelectorAll("tr.cmp"), n = 0;
    rows.forEach(function (r) {
      var hide = box.checked && r.getAttribute("data-changed") !== "1";
      r.style.display = hide ? "none" : "";
      if (!hide) n += 1;
    });
    count.textContent = n + " of " + rows.length + " prompts shown";
  }
  if (box) { box.addEventListener("change", apply); apply(); }
  window.addEventListener("beforeprint", function () {
    document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  });
})();
</script>"""


def render_html(blocks: list[tuple], plot_dir: Path) -> str:
    e = html.escape
    title = next((blk[1] for blk in blocks if blk[0] == "h1"), "lora_cai run report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(blk[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            _, headers, rows = blk
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((plot_dir / blk[1]).read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(TITLES[blk[1]])}" src="data:image/png;base64,{data}">')
        elif kind == "beside":  # an image and the table it draws, side by side where the page is wide enough
            _, name, headers, rows = blk
            data = base64.b64encode((plot_dir / name).read_bytes()).decode("ascii")
            out.append(f'<div class="beside"><img alt="{e(TITLES[name])}" src="data:image/png;base64,{data}">'
                       "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                       + "</tbody></table></div>")
        elif kind == "note":
            out.append(f'<details class="note"><summary>What the columns mean</summary><p>{e(blk[1])}</p></details>')
        elif kind == "summary":
            _, figures, lines = blk
            out.append('<section class="summary">' + "".join(
                f'<div class="fig"><div class="label">{e(label)} (held out)</div><div class="big">{e(before)} → '
                f'{e(after)}</div><div class="change">{e(change)}</div></div>' for label, before, after, change in figures)
                + "</section>")
            out.append('<ul class="checks">' + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>")
        elif kind == "compare":
            _, policies, groups = blk
            out.append('<div class="filter"><label><input type="checkbox" id="only-changed"> only prompts whose '
                       'answer or refusal verdict changed</label> <span id="shown"></span></div>')
            for title, rows in groups:
                out.append(f"<h3>{e(title)} ({len(rows)}, {sum(r['changed'] for r in rows)} changed)</h3>")
                out.append('<table class="compare"><thead><tr><th>prompt</th>' + "".join(
                    f"<th>{'base' if k == 0 else f'round {k}'}</th>" for k in policies) + "</tr></thead><tbody>")
                for r in rows:
                    cells = "".join(
                        f'<td><div class="verdict">{e(refusal_label(c))} · {e(win_label(c, k))}</div>'
                        f'{e(c.get("answer") or NA)}</td>'
                        for k, c in ((k, r["cells"].get(k, {})) for k in policies))
                    out.append(f'<tr class="cmp" data-changed="{int(r["changed"])}"><td>{e(r["prompt"] or NA)}</td>'
                               f"{cells}</tr>")
                out.append("</tbody></table>")
    out.append(_SCRIPT)
    out.append("</body></html>")
    return "\n".join(out) + "\n"
