"""One self-contained HTML page: inline CSS, figures embedded as base64 PNG (plots) and
JPEG (photo panels), no external reference."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1320px;
       color: #1d1d1f; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 36px; border-bottom: 2px solid #ddd; }
h3 { font-size: 16px; margin: 18px 0 6px; }
.meta { color: #666; font-size: 13px; }
.warning { background: #fff4e5; border-left: 5px solid #f0a020; padding: 8px 12px; margin: 12px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e3e3e3; }
thead tr:first-child th { border-top: 2px solid #333; } thead tr:last-child th { border-bottom: 1.5px solid #333; }
tbody tr:last-child td { border-bottom: 2px solid #333; }
th.group { text-align: center; border-bottom: 1px solid #999; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; } .txt { text-align: left; }
tr.random td { color: #8a5a00; background: #fffaf0; }
.note { font-size: 12px; color: #555; margin: 2px 0; }
.scroll { overflow-x: auto; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #444; }
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 18px; }
"""


def image_tag(data: bytes, alt: str, mime: str = "image/png") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{encoded}">'


def figure(data: bytes, caption: str, mime: str = "image/png") -> str:
    return f"<figure>{image_tag(data, caption, mime)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def page(title: str, meta: str, sections: list[tuple[str, str]], warning: str = "") -> str:
    """``sections``: (heading, HTML body) pairs, in order."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{html.escape(meta)} · generated {stamp}</p>"]
    if warning:
        parts.append(f"<div class='warning'>{html.escape(warning)}</div>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts)
