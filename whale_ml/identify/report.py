"""The identification report: one self-contained HTML page per batch.

Each query crop sits beside its five candidates' best-matching gallery crops, with
similarities, the parts of each ranking score (:mod:`whale_ml.identify.explain`), the
lead of the first candidate, the threshold and the decision. Images are inlined as base64 data
URIs and the style sheet is inline, so the page reads offline, mailed or archived,
and loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from whale_ml.identify.explain import format_lead, format_parts
from whale_ml.io import write_text

THUMB = 160

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#1d2733;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}
.meta{color:#566;margin-bottom:1.2em;font-size:.9em}
.photo{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:.8em;margin-bottom:1em}
.photo h2{font-size:1em;margin:0 0 .5em;word-break:break-all}
.row{display:flex;gap:.6em;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;width:THUMBpx;font-size:.8em}
figure img{width:THUMBpx;height:THUMBpx;object-fit:contain;background:#111;border-radius:4px;display:block}
figure.query img{outline:3px solid #2f6fdf}
figure.below img{opacity:.55}
figcaption{margin-top:.25em;word-break:break-all}
.sim{font-weight:600}
.parts{display:block;color:#566;font-size:.92em;margin-top:.15em}
.lead{color:#334;font-size:.9em;margin:.2em 0 .5em}
.new{color:#b5420e;font-weight:700}
.known{color:#1c7c3c;font-weight:700}
.error{color:#b00020}
.missing{width:THUMBpx;height:THUMBpx;display:flex;align-items:center;justify-content:center;background:#eee;color:#777;border-radius:4px}
""".replace("THUMB", str(THUMB))


def data_uri(path: str | Path, side: int = THUMB) -> str | None:
    """A JPEG thumbnail of an image file as a data URI (None when it cannot be read)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((side * 2, side * 2))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=88)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(path: str | None, caption: str, cls: str = "") -> str:
    uri = data_uri(path) if path else None
    picture = f'<img src="{uri}" alt="{html.escape(Path(path).name if path else "")}">' if uri else '<div class="missing">no image</div>'
    return f'<figure class="{cls}">{picture}<figcaption>{caption}</figcaption></figure>'


def render_report(result: dict[str, Any], title: str = "Photo identification") -> str:
    """The HTML page for an :func:`identify_photos` result."""
    e = html.escape
    g = result["gallery"]
    models = ", ".join(
        f"{m['fold']}: {m['registered_model']} v{m['version']}" + (f" (@{m['alias']})" if m["alias"] else "") for m in result["models"]
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        (
            f'<div class="meta">{len(result["photos"])} photo(s) &middot; gallery {e(g["version"])}: {g["photos"]} photos of '
            f"{g['individuals']} individuals ({g['enrolled_photos']} enrolled) &middot; new_individual threshold "
            f"{result['threshold']:.4f} &middot; models {e(models)}</div>"
        ),
    ]
    for row in result["photos"]:
        parts.append('<section class="photo">')
        if row["status"] != "ok":
            parts.append(f'<h2>{e(row["image"])}</h2><p class="error">could not be identified: {e(str(row["error"]))}</p></section>')
            continue
        verdict = '<span class="new">new_individual</span>' if row["new_individual"] else f'<span class="known">{e(row["decision"])}</span>'
        crop = "full frame" if row["crop_is_full_frame"] else "detector box"
        parts.append(f"<h2>{e(row['image'])} &rarr; {verdict} <small>(threshold {row['threshold']:.4f}; {crop})</small></h2>")
        lead = format_lead(row, times="×")
        if lead:
            parts.append(f'<p class="lead">{e(lead)}</p>')
        parts.append('<div class="row">')
        parts.append(_figure(row["crop_path"], f"query<br>{e(row['image'])}", "query"))
        for c in row["candidates"]:
            side = "&ge;" if c["above_threshold"] else "&lt;"
            # Why it ranks here: each matcher's weight x probability (the plain cosine without a fusion).
            explained = f'<span class="parts">{e(format_parts(c, times="×"))}</span>' if c.get("score_parts") else "<br>"
            caption = (
                f"#{c['rank']} <b>{e(c['individual_id'])}</b><br>"
                f'<span class="sim">{c["similarity"]:.4f}</span> {side} threshold{explained}{e(c["gallery_image"])}'
                + (" (enrolled)" if c["gallery_source"] == "enrolled" else "")
            )
            parts.append(_figure(c["gallery_crop"], caption, "" if c["above_threshold"] else "below"))
        parts.append("</div>")
        parts.append(f"<p>predictions: <code>{e(' '.join(row['predictions']))}</code></p></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: dict[str, Any], path: str | Path, title: str = "Photo identification") -> Path:
    """Write the report page atomically."""
    return write_text(path, render_report(result, title))
