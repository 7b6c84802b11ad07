"""Image features -> captions: the one decoding path that validation, `evaluate`, the `Captioner` API and
the web service share. Open this file first to see how a caption is chosen.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from tqdm import tqdm

from common.vocab import Vocabulary
from stage2_decoder.decoding.beam import beam_search_nbest
from stage2_decoder.decoding.config import DecodeConfig, SampleConfig, check_bounds
from stage2_decoder.decoding.sampling import greedy_scored, sample_captions
from stage2_decoder.model import CaptionDecoder


def decode_features(decoder: CaptionDecoder, vocab: Vocabulary, feats: torch.Tensor, dcfg: DecodeConfig,
                    scfg: SampleConfig, keys: list[int] | None = None) -> list[dict]:
    """(B, D) features -> per row {"caption", "captions"}: N distinct beam hypotheses or N samples (each
    row's draws seeded from (seed, its key), default its feature row: sampling.sample_captions)."""
    feats = feats.to(next(decoder.parameters()).device)
    if scfg.sample:
        hyps = sample_captions(decoder, feats, scfg.num_captions, dcfg.max_len, dcfg.min_len,
                               scfg.temperature, scfg.top_p, scfg.seed, keys)
    elif dcfg.beam_size == scfg.num_captions == 1 and dcfg.no_repeat_ngram == 0:  # a beam of one, faster
        hyps = greedy_scored(decoder, feats, dcfg.max_len, dcfg.min_len, dcfg.length_penalty)
    else:  # the beam holds at least N hypotheses
        hyps = beam_search_nbest(decoder, feats, replace(dcfg, beam_size=max(dcfg.beam_size, scfg.num_captions)))
    out = []
    for row in hyps:
        captions, seen = [], set()
        for ids, score in row:
            text = vocab.caption(ids)
            if scfg.sample or text not in seen:  # samples may repeat; beam alternatives are distinct
                seen.add(text)
                captions.append({"caption": text, "score": float(score)})
        captions = captions[:scfg.num_captions]
        out.append({"caption": captions[0]["caption"], "captions": captions})
    return out


def caption_keys(decoder: CaptionDecoder, vocab: Vocabulary, keys: list[str], feats: torch.Tensor,
                 decode_cfg: DecodeConfig | None = None, batch_size: int = 256, progress: bool = False,
                 desc: str = "decode") -> dict[str, str]:
    """Each key's best caption; `feats` (len(keys), D) holds their features in the same order."""
    dcfg = decode_cfg or DecodeConfig()
    check_bounds(dcfg)
    out = {}
    # minutes for a full COCO split on a CPU: a bar, gone when done
    with tqdm(total=len(keys), desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True) as bar:
        for s in range(0, len(keys), batch_size):
            rows = decode_features(decoder, vocab, feats[s:s + batch_size], dcfg, SampleConfig())
            out.update(zip(keys[s:s + batch_size], (r["caption"] for r in rows)))
            bar.update(len(rows))
    return out
