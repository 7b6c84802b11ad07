"""The service's one page (`GET /`): pick or drop photos, see each with its caption and alternatives.

Self-contained: no external script, style, font or image, so it works offline. Every text from the
server or the user (file names, captions, errors) goes in through `textContent`, never as markup. The
Content-Security-Policy (sent as a header and repeated in a <meta>) allows only this page's own script
and style (by hash), photos from `blob:` object URLs, and requests to the same origin.
Each photo is sent as its own request, so the server's batcher gathers a dropped folder into batches;
cards keep the order the photos were chosen in, and a request refused with 503 is sent again after
the server's Retry-After (3 times at most).
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
.score { color: #777; font-size: .85em; }
.alts { margin: .3em 0 0; padding-left: 1.6em; color: #444; font-size: .9em; }
.error { color: #b00; }
.pending .caption { color: #999; font-weight: normal; }
"""

SCRIPT = """
"use strict";
const input = document.getElementById("files"), drop = document.getElementById("drop");
const cards = document.getElementById("cards");
const RETRIES = 3;  // a 503 (queue full) is tried again after the server's Retry-After

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function scored(c) {
  return c.caption + " (score " + c.score.toFixed(2) + ")";
}

async function send(file) {
  for (let attempt = 0; ; attempt++) {
    const form = new FormData();
    form.append("images", file, file.name);
    form.append("num_captions", document.getElementById("num").value);
    form.append("beam_size", document.getElementById("beam").value);
    let reply;
    try {
      reply = await fetch("v1/caption", {method: "POST", body: form});
    } catch (err) {
      throw new Error("The server could not be reached.");
    }
    let data = null;
    try { data = await reply.json(); } catch (err) { data = null; }
    if (reply.ok && data) return data.results[0];
    if (reply.status === 503 && attempt < RETRIES) {
      const wait = Math.min(60, Number(reply.headers.get("Retry-After")) || 2);
      await new Promise(done => setTimeout(done, 1000 * wait));
      continue;
    }
    throw new Error(data && data.error ? data.error : "The server answered with an error (HTTP " + reply.status + ").");
  }
}

async function captionOne(file, card) {
  const img = el("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  const caption = el("div", "caption", "captioning\u2026"), score = el("div", "score");
  const alts = el("ol", "alts");
  alts.start = 2;  // the alternatives are the 2nd, 3rd, ... best captions
  card.append(img, el("div", "name", file.name), caption, score, alts);
  try {
    const r = await send(file);
    caption.textContent = r.caption;
    score.textContent = "score " + r.captions[0].score.toFixed(2);
    for (const alt of r.captions.slice(1)) alts.append(el("li", "", scored(alt)));
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
  // every card is placed first, in the order chosen; answers fill them in as they come
  const placed = Array.from(files).map(f => {
    const card = el("div", "card pending");
    cards.append(card);
    return [f, card];
  });
  for (const [f, card] of placed) captionOne(f, card);
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
