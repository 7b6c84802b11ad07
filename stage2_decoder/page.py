"""The service's one page (`GET /`): pick or drop photos, see each with its caption and alternatives.

Self-contained: no external script, style, font or image, so it works offline. Every text from the
server or the user (file names, captions, errors) goes in through `textContent`, never as markup. The
Content-Security-Policy (sent as a header and repeated in a <meta>) allows only this page's own script
and style (by hash), photos from `blob:` object URLs, and requests to the same origin.
Each photo is sent as its own request, so the server's batcher gathers a dropped folder into batches.
"""
from __future__ import annotations

import base64
import hashlib

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 980px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; }
#drop { border: 2px dashed #999; border-radius: 8px; padding: 2em; text-align: center; color: #555; }
#drop.over { border-color: #2a6; background: #efe; }
#controls { margin: 1em 0; }
#controls label { margin-right: 1.5em; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em; }
.card img { width: 100%; height: 220px; object-fit: cover; border-radius: 4px; }
.name { color: #777; font-size: .85em; overflow-wrap: anywhere; }
.caption { font-weight: 600; margin: .3em 0; }
.alts { margin: 0; padding-left: 1.3em; color: #444; font-size: .9em; }
.error { color: #b00; }
.pending .caption { color: #999; font-weight: normal; }
"""

SCRIPT = """
"use strict";
const input = document.getElementById("files"), drop = document.getElementById("drop");
const cards = document.getElementById("cards");

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function captionOne(file) {
  const card = el("div", "card pending");
  const img = el("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  const caption = el("div", "caption", "captioning\\u2026"), alts = el("ol", "alts");
  card.append(img, el("div", "name", file.name), caption, alts);
  cards.prepend(card);
  const form = new FormData();
  form.append("images", file, file.name);
  form.append("num_captions", document.getElementById("num").value);
  form.append("beam_size", document.getElementById("beam").value);
  try {
    const reply = await fetch("v1/caption", {method: "POST", body: form});
    const data = await reply.json();
    if (!reply.ok) throw new Error(data.error || ("HTTP " + reply.status));
    const r = data.results[0];
    caption.textContent = r.caption;
    for (const alt of r.captions.slice(1)) {
      alts.append(el("li", "", alt.caption + " (" + alt.score.toFixed(2) + ")"));
    }
    card.classList.remove("pending");
    card.classList.add("done");
  } catch (err) {
    caption.textContent = String(err.message || err);
    caption.classList.add("error");
    card.classList.remove("pending");
    card.classList.add("failed");
  }
}

function captionAll(files) {
  for (const f of files) captionOne(f);
}

input.addEventListener("change", () => { captionAll(input.files); input.value = ""; });
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", e => captionAll(e.dataTransfer.files));
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# the <meta> copy covers the page saved to disk; frame-ancestors only counts in the header
META_CSP = ("default-src 'none'; "
            f"script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; img-src blob: data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'")
CSP = META_CSP + "; frame-ancestors 'none'"

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{META_CSP}">
<title>capcache: caption photos</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body>
<h1>Caption photos</h1>
<div id="drop">Drop photos here, or
<label>choose them: <input id="files" type="file" accept="image/*" multiple></label></div>
<div id="controls">
<label>captions per photo
<select id="num"><option>1</option><option selected>3</option><option>5</option></select></label>
<label>beam size <select id="beam"><option>1</option><option selected>3</option><option>5</option></select></label>
</div>
<div id="cards"></div>
<script>{SCRIPT}</script>
</body>
</html>
"""
