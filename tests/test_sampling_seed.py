"""`--sample --seed`: a photo's sampled captions depend on the seed and the photo, not on where it stands in
the request or how the request is split into batches."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from reliability_helpers import tiny_run


@pytest.fixture(scope="module")
def ckpt(shared_cache, tmp_path_factory):
    return tiny_run(shared_cache, tmp_path_factory) / "best.pt"


def _samples(ckpt, paths, *more) -> list[list[str]]:
    from stage2_decoder.caption import main

    r = CliRunner().invoke(main, [*map(str, paths), "--checkpoint", str(ckpt), "--device", "cpu", "--json",
                                  "--sample", "--num-captions", "3", "--seed", "1", "--temperature", "2", *more])
    assert r.exit_code == 0, r.output
    return [[c["caption"] for c in d["captions"]] for d in json.loads(r.stdout)]


def test_a_photo_gets_the_same_samples_alone_or_third_of_six(ckpt, coco_records):
    paths = [coco_records[i].path for i in (1, 2, 0, 3, 4, 6)]
    alone = _samples(ckpt, paths[2:3])[0]
    among = _samples(ckpt, paths)
    chunked = _samples(ckpt, paths, "--batch-size", "2")
    assert among[2] == alone and chunked[2] == alone
    assert among == chunked  # every photo, whatever the batches
    assert len({c for caps in among for c in caps}) > 3  # the draws are random, not one caption repeated


def test_the_seed_still_picks_the_draws(ckpt, coco_records):
    from stage2_decoder.api import Captioner

    cap = Captioner.load(ckpt, device="cpu")
    path = coco_records[0].path
    runs = [[c["caption"] for c in cap.caption([path], sample=True, num_captions=5, temperature=2.0,
                                               seed=s)[0]["captions"]] for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
