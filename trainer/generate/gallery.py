"""The HTML gallery of a generate run: one self-contained page (relative links into its own folder)."""

from __future__ import annotations

import html
import json
import os

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;background:#fafafa}"
    ".grid{display:flex;flex-wrap:wrap;gap:1em}.card{background:#fff;padding:.6em;border:1px solid #ddd;"
    "max-width:540px}video,img{max-width:100%;display:block}pre{font-size:12px;white-space:pre-wrap}"
)


def write_gallery(out_dir: str, report: dict) -> str:
    """index.html next to the videos: each sample's prompt, seed and video (<video> with a relative src, the
    GIF too when written), and every setting. Works wherever the folder is copied (no absolute paths)."""
    s = report["settings"]
    cards = []
    for sample in report["samples"]:
        media = f'<video src="{html.escape(sample["mp4"])}" controls loop muted autoplay playsinline></video>'
        if sample.get("gif"):
            media += f'<img src="{html.escape(sample["gif"])}" alt="GIF">'
        cards.append(
            f'<div class="card">{media}<p><b>#{sample["index"]}</b> {html.escape(sample["prompt"])}</p>'
            f"<p>seed {sample['seed']} &middot; {sample['frames']} frames</p></div>"
        )
    r = s["resolved"]
    summary = (
        f"{r['width']}x{r['height']}, {s['frames']} frames, {r['steps']} DDIM steps, cfg {s['cfg']}, "
        f"eta {s['eta']}, fps {r['fps']}, {s['dtype']} on {r['device']}"
        + (" (FIFO-Diffusion)" if report.get("fifo") else "")
    )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>latentcrafter generate</title>'
        f"<style>{STYLE}</style></head><body><h1>latentcrafter generate</h1>"
        f"<p>{html.escape(report['model']['preset'] or 'model')} &middot; {html.escape(summary)}</p>"
        f'<div class="grid">{"".join(cards)}</div>'
        "<h2>Settings</h2><pre>"
        + html.escape(
            json.dumps({k: report[k] for k in ("settings", "model", "timings", "peak_memory")}, indent=2)
        )
        + "</pre></body></html>\n"
    )
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


__all__ = ["write_gallery"]
