"""Caption metrics: the COCO caption evaluation code (pycocoevalcap) plus what users check
when a captioner goes wrong (vocabulary used, distinct captions, the most repeated caption).

`score_captions` is the reported evaluation: PTB tokenizer (Java), BLEU-1..4, METEOR (Java),
ROUGE-L, CIDEr, and SPICE when asked and it can run. `cider` is the fast in-process CIDEr
(our own tokenizer, pure Python) used for validation during training.

Both take the run's tokenizer (`Vocabulary.tokenizer`). The PTB tokenizer, METEOR and SPICE are
English tools: they serve `nltk` runs only; for `whitespace` and `chars` runs references and
results are split by the run's own tokenizer and the scorers get its tokens joined by spaces.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
import unicodedata
from collections import Counter

from common.tokenizer import DEFAULT_TOKENIZER, tokenize


def caption_stats(res: dict[str, str], tokenizer: str = DEFAULT_TOKENIZER) -> dict:
    """Diversity of generated captions: words (characters for `chars`) used, distinct fraction, the most
    repeated caption."""
    caps = list(res.values())
    if not caps:
        return {"vocab_used": 0, "distinct_fraction": 0.0, "most_common_caption": "", "most_common_fraction": 0.0}
    counts = Counter(caps)
    top, n = counts.most_common(1)[0]
    units = (lambda c: tokenize(c, tokenizer)) if tokenizer == "chars" else str.split  # chars: no spaces to split on
    return {"vocab_used": len({w for c in caps for w in units(c)}), "distinct_fraction": len(counts) / len(caps),
            "most_common_caption": top, "most_common_fraction": n / len(caps)}


def _spaced(text: str, tokenizer: str) -> str:
    """What pycocoevalcap's scorers read: the tokens joined by spaces (they split on spaces)."""
    return " ".join(tokenize(text, tokenizer))


def cider(gts: dict[str, list[str]], res: dict[str, str], tokenizer: str = DEFAULT_TOKENIZER
          ) -> tuple[float, dict[str, float]]:
    """CIDEr-D with pycocoevalcap's scorer on our tokenizer's output (no Java): corpus score and per image."""
    from pycocoevalcap.cider.cider import Cider

    keys = sorted(res)
    g = {k: [_spaced(r, tokenizer) for r in gts[k]] for k in keys}
    r = {k: [_spaced(res[k], tokenizer) or "<empty>"] for k in keys}
    score, per = Cider().compute_score(g, r)
    return float(score), {k: float(s) for k, s in zip(keys, per)}


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenizing ({key: captions} -> {key: tokens joined by spaces}, punctuation
    dropped), the same Stanford jar and flags, with its input file in the temp folder: pycocoevalcap's
    own `PTBTokenizer` writes it into its package folder, which a user who did not install the
    package (a shared or system environment, a container run as another user) cannot write."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    keys = [k for k, caps in captions.items() for _ in caps]
    # one line per caption: the tokenizer also ends a line at \r, \v, \f, U+2028..., which shifted every
    # later caption onto the image before it
    # composed (NFC) as our tokenizers read text: "café" with a separate accent matches the decoder's "café"
    text = unicodedata.normalize("NFC", "\n".join(" ".join(c.splitlines()) for caps in captions.values() for c in caps))
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    fd, path = tempfile.mkstemp(prefix="capcache-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], stdin=subprocess.DEVNULL, capture_output=True, check=False)
    finally:
        os.remove(path)
    lines = out.stdout.decode().split("\n")
    if out.returncode != 0 or len(lines) < len(keys):
        err = out.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"the PTB tokenizer (Java) failed: {err[-1] if err else f'exit {out.returncode}'}")
    if any(line.strip() for line in lines[len(keys):]):  # a caption split in two: the rest would be misaligned
        raise RuntimeError(f"the PTB tokenizer (Java) wrote {len(lines)} lines for {len(keys)} captions")
    tokenized: dict[str, list[str]] = {}
    for key, line in zip(keys, lines):
        words = (w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
        tokenized.setdefault(key, []).append(" ".join(words))
    return tokenized


def score_captions(gts: dict[str, list[str]], res: dict[str, str], spice: bool = False,
                   tokenizer: str = DEFAULT_TOKENIZER) -> tuple[dict, dict, list[str]]:
    """Standard COCO caption metrics. Returns (corpus metrics, per-image CIDEr, notes about skipped parts)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = sorted(res)
    notes: list[str] = []
    english = tokenizer == "nltk"
    java = english and java_available()
    if java:
        g = ptb_tokenize({k: gts[k] for k in keys})
        r = ptb_tokenize({k: [res[k]] for k in keys})
    else:
        notes.append("Java not found: PTB tokenizer, METEOR and SPICE skipped (our tokenizer used for the rest)"
                     if english else f"tokenizer {tokenizer}: scored on its tokens; the English-only PTB "
                                     f"tokenizer, METEOR and SPICE skipped")
        g = {k: [_spaced(c, tokenizer) for c in gts[k]] for k in keys}
        r = {k: [_spaced(res[k], tokenizer)] for k in keys}
    r = {k: [v[0] if v and v[0].strip() else "<empty>"] for k, v in r.items()}  # scorers reject empty strings
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its internals
        bleu, _ = Bleu(4).compute_score(g, r)
    for n, b in enumerate(bleu, start=1):
        metrics[f"BLEU-{n}"] = float(b)
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        m = Meteor()
        try:
            metrics["METEOR"] = float(m.compute_score(g, r)[0])
        finally:
            _close_meteor(m)
    metrics["ROUGE-L"] = float(Rouge().compute_score(g, r)[0])
    c, per = Cider().compute_score(g, r)
    metrics["CIDEr"] = float(c)
    if spice and english:
        try:
            from pycocoevalcap.spice.spice import Spice
            with contextlib.redirect_stdout(io.StringIO()):
                metrics["SPICE"] = float(Spice().compute_score(g, r)[0])
        except Exception as e:  # it downloads Stanford CoreNLP models on first use
            notes.append(f"SPICE skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return metrics, {k: float(s) for k, s in zip(keys, per)}, notes


def _close_meteor(m) -> None:
    with contextlib.suppress(Exception):
        with m.lock:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
