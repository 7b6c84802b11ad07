"""Bad artefacts (Bad input: artefacts): caches and checkpoints that are damaged, made
differently, from the future, or not what they claim. Each is one `error:` line naming the file
and what to do, exit 1, never a traceback; an unpickling attack is refused by weights_only=True.

Caches are doctored copies of the shared 48-image mobilenet cache (h5py attribute edits, byte
damage); checkpoints are doctored copies of a one-batch run's best.pt / last.pt.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from reliability_helpers import TINY, one_error_line, tiny_run


@pytest.fixture(scope="module")
def run_dir(shared_cache, tmp_path_factory) -> Path:
    return tiny_run(shared_cache, tmp_path_factory)


def _doctored_cache(src: Path, dst: Path, **attrs) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs.update(attrs)
    return dst


def _doctored_checkpoint(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def _caption(ckpt: Path, image: str, *more):
    from stage2_decoder.caption import main

    return CliRunner().invoke(main, [image, "--checkpoint", str(ckpt), "--device", "cpu", *more])


def _evaluate(ckpt: Path, features: Path):
    from stage2_decoder.evaluate import main

    return CliRunner().invoke(main, ["--checkpoint", str(ckpt), "--features", str(features), "--device", "cpu",
                                     "--workers", "0"])


def _train(features: Path, out: Path, *more):
    from stage2_decoder.train import main

    return CliRunner().invoke(main, ["--features", str(features), "--out", str(out), "--epochs", "1", "--dry-run",
                                     "--no-progress", "--embed-size", str(TINY["embed_size"]), "--hidden-size",
                                     str(TINY["hidden_size"]), "--vocab-threshold", str(TINY["vocab_threshold"]),
                                     "--batch-size", "16", "--device", "cpu", *more])


# --- caches ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs, says", [
    ({"backbone": "resnet152"}, "backbone 'resnet152', expected 'mobilenet_v2'"),
    ({"feature_dim": 2048}, "feature size 2048, expected 1280"),
    ({"preprocess": '{"crop": 299}'}, "different preprocessing"),
    # the same network with other weights: its captions would all be one (random weights) or wrong
    ({"weights": "none"}, "weights 'none', expected 'IMAGENET1K_V1'"),
    ({"weights": "/elsewhere/mbv2.pth", "weights_sha256": "ab" * 32}, "weights '/elsewhere/mbv2.pth'"),
])
def test_evaluate_refuses_a_cache_made_another_way(run_dir, shared_cache, tmp_path, attrs, says):
    cache = _doctored_cache(shared_cache, tmp_path / "other.h5", **attrs)
    line = one_error_line(_evaluate(run_dir / "best.pt", cache))
    assert str(cache) in line and says in line and "stage1_extract" in line


def test_evaluate_knows_a_weights_file_by_its_digest_wherever_it_was(run_dir, shared_cache, tmp_path):
    def moved(c):
        c["backbone"].update(weights="/then/mbv2.pth", weights_sha256="ab" * 32)

    ckpt = _doctored_checkpoint(run_dir / "best.pt", tmp_path / "best.pt", moved)
    cache = _doctored_cache(shared_cache, tmp_path / "now.h5", weights="/now/mbv2.pth", weights_sha256="ab" * 32)
    r = _evaluate(ckpt, cache)
    assert r.exit_code == 0, r.output


def test_training_needs_the_captions_not_the_images_folder_the_cache_names(shared_cache, tmp_path):
    """A cache made on another machine (or whose photos moved) names a folder that is not here: training, which
    reads captions only, refused with "images folder not found"."""
    cache = _doctored_cache(shared_cache, tmp_path / "moved.h5", images_dir=str(tmp_path / "gone" / "images"))
    r = _train(cache, tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "best.pt").is_file()


def test_a_cache_of_fewer_than_three_images_says_so(shared_cache, tmp_path):
    """It said "is this the captions file the cache was made from?" of the very file."""
    cache = shutil.copy(shared_cache, tmp_path / "two.h5")
    with h5py.File(cache, "r+") as f:
        status = f["status"][:]
        status[2:] = 0  # all but two rows not extracted
        f["status"][:] = status
    line = one_error_line(_train(Path(cache), tmp_path / "run"))
    assert f"{cache} holds features of 2 images: training needs at least 3" in line, line


def test_a_file_as_the_run_folder_is_one_line_before_the_data_loads(shared_cache, tmp_path, monkeypatch):
    import stage2_decoder.training.loop as loop_mod

    (tmp_path / "afile").write_text("")
    loaded = []
    monkeypatch.setattr(loop_mod, "load_train_data", lambda *a, **k: loaded.append(1))
    line = one_error_line(_train(shared_cache, tmp_path / "afile"))
    assert line == f"error: --out {tmp_path / 'afile'} is a file: training writes a run folder there" and not loaded


def test_resuming_on_a_cache_rebuilt_with_another_backbone_is_refused(run_dir, shared_cache, tmp_path):
    """Same path, same feature size, other backbone: resuming would train on features of another
    meaning. The run names the backbone change instead."""
    cache = tmp_path / "cache.h5"
    shutil.copy(shared_cache, cache)
    run = tmp_path / "run"
    assert _train(cache, run).exit_code == 0
    _doctored_cache(shared_cache, cache, backbone="resnet50")  # rebuilt in place (size kept, to be sneaky)
    line = one_error_line(_train(cache, run, "--epochs", "2"))
    assert "backbone name" in line and str(run / "last.pt") in line


@pytest.mark.parametrize("damage", ["truncated", "zeroed header", "empty", "text"])
def test_damaged_cache_is_one_error_line_for_train_and_evaluate(run_dir, shared_cache, tmp_path, damage):
    cache = tmp_path / "damaged.h5"
    data = shared_cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) // 2], "zeroed header": b"\0" * 4096 + data[4096:],
                       "empty": b"", "text": b"features,keys\n1,2\n"}[damage])
    for result in (_train(cache, tmp_path / "run"), _evaluate(run_dir / "best.pt", cache)):
        line = one_error_line(result)
        assert str(cache) in line and "stage 1" in line
    assert not (tmp_path / "run").exists()  # nothing written for an unusable input


def test_cache_with_non_finite_features_is_refused_by_training_and_evaluate(run_dir, shared_cache, tmp_path):
    """HDF5 keeps no checksums: bit rot reads back as garbage. nan/inf features would train a nan model, and
    evaluate scored such a cache with exit 0, an empty caption for each damaged row."""
    cache = tmp_path / "rotten.h5"
    shutil.copy(shared_cache, cache)
    with h5py.File(cache, "r+") as f:
        f["features"][5, :7] = np.inf
    for result in (_train(cache, tmp_path / "run"), _evaluate(run_dir / "best.pt", cache)):
        line = one_error_line(result)
        assert str(cache) in line and "non-finite" in line


@pytest.mark.parametrize("value", ["no", "False", 1])
def test_a_cache_whose_complete_flag_is_not_a_bool_is_refused(run_dir, shared_cache, tmp_path, value):
    """`complete="no"` counted as a finished cache (bool("no") is True)."""
    cache = tmp_path / "odd.h5"
    shutil.copy(shared_cache, cache)
    with h5py.File(cache, "r+") as f:
        f.attrs["complete"] = value
    line = one_error_line(_evaluate(run_dir / "best.pt", cache))
    assert str(cache) in line and "'complete'" in line and "expected bool" in line, line


def test_cache_missing_a_dataset_is_one_error_line(shared_cache, tmp_path):
    cache = tmp_path / "nostatus.h5"
    shutil.copy(shared_cache, cache)
    with h5py.File(cache, "r+") as f:
        del f["status"]
    line = one_error_line(_train(cache, tmp_path / "run"))
    assert str(cache) in line and "stage 1" in line


def test_cache_of_a_future_schema_version(run_dir, shared_cache, tmp_path):
    cache = _doctored_cache(shared_cache, tmp_path / "v9.h5", schema_version=9)
    line = one_error_line(_train(cache, tmp_path / "run"))
    assert str(cache) in line and "version 9" in line


# --- checkpoints -------------------------------------------------------------------------------------------

class Boom:
    """Unpickling this would create a marker file: the attack a weights_only load must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_objects_are_refused_through_the_real_cli(cli, run_dir, coco_records, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    ckpt["payload"] = Boom(marker)
    torch.save(ckpt, evil)
    proc = cli("stage2_decoder.caption", coco_records[0].path, "--checkpoint", evil, "--device", "cpu")
    line = one_error_line(proc)
    assert str(evil) in line and "weights_only=True" in line
    assert not marker.exists()  # nothing was executed
    assert proc.stdout == ""


def _version(v):
    def edit(c):
        c["version"] = v
    return edit


def _vocab_plus_one(c):
    c["vocab"]["words"].append("zebraword")  # the decoder still has the old vocabulary size


def _drop_backbone_name(c):
    del c["backbone"]["name"]


def _backbone_name_a_list(c):
    c["backbone"]["name"] = [c["backbone"]["name"]]  # was TypeError: unhashable type: 'list', a traceback


def _backbone_weights_a_number(c):
    c["backbone"]["weights"] = 5  # was TypeError from Path(5), a traceback


def _bad_config(c):
    c["decoder_config"]["hidden_size"] = "many"


def _extra_config_key(c):
    c["decoder_config"]["attention"] = True


def _other_weights_shape(c):
    c["model_state"]["embed.weight"] = torch.zeros(3, 3)


def _nan_weights(c):
    c["model_state"]["out_bias"][5] = float("nan")  # a diverged run: empty captions, NaN scores, exit 0


def _forged_word(c):
    c["vocab"]["words"][10] = "table\nforged.jpg\ta forged caption"  # would print a line of its own


def _backbone_of_another_size(c):
    c["backbone"]["feature_dim"] = 2 * c["decoder_config"]["feature_dim"]


@pytest.mark.parametrize("edit, says", [
    (_nan_weights, "not finite (NaN or inf in out_bias)"),
    (_forged_word, "words no tokenizer makes"),
    (_backbone_of_another_size, "does not match the checkpoint's"),
    (_version(2), "newer capcache"),
    (_version(0), "version 0"),
    (_vocab_plus_one, "words but its vocabulary"),
    (_drop_backbone_name, "backbone description"),
    (_backbone_name_a_list, "backbone name must be str, got list"),
    (_backbone_weights_a_number, "backbone weights must be str or None, got int"),
    (_bad_config, "decoder config"),
    (_extra_config_key, "decoder config"),
    (_other_weights_shape, "do not fit"),
])
def test_doctored_checkpoints_are_one_error_line(run_dir, coco_records, tmp_path, edit, says):
    ckpt = _doctored_checkpoint(run_dir / "best.pt", tmp_path / "doctored.pt", edit)
    line = one_error_line(_caption(ckpt, coco_records[0].path))
    assert says in line, line


def test_a_weights_file_that_is_not_plain_is_refused_without_torchs_advice_to_unpickle_it(run_dir, coco_records,
                                                                                         tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "w.pth"
    evil.write_bytes(pickle.dumps({"conv.weight": Boom(marker)}, protocol=4))  # a raw pickle, no torch zip
    line = one_error_line(_caption(run_dir / "best.pt", coco_records[0].path, "--weights", evil))
    assert str(evil) in line and "refusing to unpickle" in line and "weights_only=False" not in line, line
    assert not marker.exists()


@pytest.mark.parametrize("what", ["random bytes", "text", "empty", "truncated", "zip of other things",
                                  "plain state_dict", "a directory", "a list"])
def test_files_that_are_not_checkpoints(run_dir, shared_cache, coco_records, tmp_path, what):
    p = tmp_path / "best.pt"
    good = (run_dir / "best.pt").read_bytes()
    if what == "random bytes":
        p.write_bytes(os.urandom(5000))
    elif what == "text":
        p.write_text("this is a checkpoint, honest\n")
    elif what == "empty":
        p.write_bytes(b"")
    elif what == "truncated":
        p.write_bytes(good[: len(good) * 2 // 3])
    elif what == "zip of other things":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("data.txt", "hello")
    elif what == "plain state_dict":
        torch.save({"weight": torch.zeros(2)}, p)
    elif what == "a directory":
        p.mkdir()
    else:
        torch.save([1, 2, 3], p)
    for result in (_caption(p, coco_records[0].path), _evaluate(p, shared_cache)):
        assert str(p) in one_error_line(result)


@pytest.mark.parametrize("what", ["the feature cache", "a JSON file", "a PNG"])
def test_another_kind_of_file_given_as_the_checkpoint_is_not_called_an_unsafe_pickle(shared_cache, coco_records,
                                                                                     tmp_path, what):
    """torch.load reads any non-zip file as a legacy pickle: an HDF5 cache was "refused" as holding objects
    other than plain values (the message for a pickled attack) instead of named what it is not."""
    p = shared_cache if what == "the feature cache" else tmp_path / ("x.json" if what == "a JSON file" else "x.png")
    if what == "a JSON file":
        p.write_text('{"epochs": 20}\n')
    elif what == "a PNG":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(p)
    line = one_error_line(_caption(p, coco_records[0].path))
    assert f"{p} is not a PyTorch checkpoint file" in line and "unpickle" not in line, line


def test_resuming_from_a_last_pt_with_another_vocabulary_is_refused(shared_cache, tmp_path):
    run = tmp_path / "run"
    assert _train(shared_cache, run).exit_code == 0

    def other_vocab(c):
        c["vocab"]["words"][-1] = "zebraword"

    _doctored_checkpoint(run / "last.pt", run / "last.pt", other_vocab)
    line = one_error_line(_train(shared_cache, run, "--epochs", "2"))
    assert "vocabulary" in line and str(run) in line


def test_resuming_with_another_validation_decoder_is_refused_and_old_runs_resume_as_greedy(shared_cache, tmp_path):
    """best.pt's score so far came from one decoder; switching it mid-run would compare unlike numbers.
    A last.pt from before --val-beam-size existed validated greedily, and resumes as that."""
    run = tmp_path / "run"
    assert _train(shared_cache, run, "--scst-epochs", "0", "--val-beam-size", "1").exit_code == 0
    line = one_error_line(_train(shared_cache, run, "--epochs", "2", "--scst-epochs", "0", "--val-beam-size", "3"))
    assert "val_beam_size" in line and str(run) in line
    _doctored_checkpoint(run / "last.pt", run / "last.pt", lambda c: c["train_config"].pop("val_beam_size"))
    result = _train(shared_cache, run, "--epochs", "2", "--scst-epochs", "0", "--val-beam-size", "1")
    assert result.exit_code == 0, result.output
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_resuming_with_the_other_output_layer_is_refused_and_old_runs_resume_untied(shared_cache, tmp_path):
    """A tied decoder has no output weight of its own: last.pt's weights only fit the layer they were
    trained with. A last.pt from before --tie-embeddings existed had its own output layer."""
    run = tmp_path / "run"
    assert _train(shared_cache, run, "--scst-epochs", "0", "--tie-embeddings", "false").exit_code == 0
    line = one_error_line(_train(shared_cache, run, "--epochs", "2", "--scst-epochs", "0"))  # the default: tied
    assert "tie_embeddings" in line and str(run) in line
    _doctored_checkpoint(run / "last.pt", run / "last.pt", lambda c: c["train_config"].pop("tie_embeddings"))
    result = _train(shared_cache, run, "--epochs", "2", "--scst-epochs", "0", "--tie-embeddings", "false")
    assert result.exit_code == 0, result.output
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("missing", ["optimizer_state", "rng_state", "epoch", "best"])
def test_resuming_from_a_last_pt_missing_training_state(shared_cache, tmp_path, missing):
    run = tmp_path / "run"
    assert _train(shared_cache, run).exit_code == 0
    _doctored_checkpoint(run / "last.pt", run / "last.pt", lambda c: c.pop(missing))
    line = one_error_line(_train(shared_cache, run, "--epochs", "2"))
    assert "cannot resume" in line and str(run / "last.pt") in line


# --- random byte damage: only CacheError (or a clean load) may come out of load_cache ---------------------

_FUZZ_WORKER = """
import random, sys
from pathlib import Path
from common.feature_cache import CacheError, load_cache
src, out = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
for seed in map(int, sys.argv[3:]):
    rng, b = random.Random(seed), bytearray(src)
    for _ in range(20):
        j = rng.randrange(len(b))
        b[j] = rng.randrange(256)
    out.write_bytes(bytes(b))
    try:
        load_cache(out)
        outcome = "loads"
    except CacheError as e:
        outcome = "CacheError" if str(out) in str(e) else "CacheError without the path"
    except Exception as e:
        outcome = type(e).__name__
    print(seed, outcome, flush=True)
"""


def fuzz_cache(cache: Path, scratch: Path, seeds: range) -> dict[int, str]:
    """load_cache on copies of `cache` with 20 random bytes overwritten, one outcome per seed. Runs in
    subprocesses: the HDF5 C library can crash outright on damaged files ("crash" then)."""
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO))
    outcomes, todo = {}, list(seeds)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _FUZZ_WORKER, str(cache), str(scratch), *map(str, todo)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        for line in proc.stdout.splitlines():
            seed, outcome = line.split(" ", 1)
            outcomes[int(seed)] = outcome
        todo = [s for s in todo if s not in outcomes]
        if todo and proc.returncode != 0:
            outcomes[todo.pop(0)] = "crash" if proc.returncode < 0 else f"exit {proc.returncode}: {proc.stderr[-300:]}"
    return outcomes


def test_randomly_damaged_cache_only_ever_raises_cache_error(shared_cache, tmp_path):
    outcomes = fuzz_cache(shared_cache, tmp_path / "damaged.h5", range(40))
    bad = {s: o for s, o in outcomes.items() if o not in ("loads", "CacheError", "crash")}
    assert not bad, bad


def test_vocabularies_older_tokenizers_made_still_load_and_line_breaks_do_not():
    """Tokenizers before common.tokenizer._visible kept invisible format characters inside words (a Persian
    word's right-to-left mark, a soft hyphen): their checkpoints must still load. A word with a line break,
    a line separator or a control character no tokenizer ever made: refused."""
    from common.vocab import SPECIALS, Vocabulary, VocabError

    Vocabulary([*SPECIALS, "\u200fکتاب", "co\xadoperate", "می\u200cخواهم"])
    for bad in ("a\nb", "a\u2028b", "x\x1b[2J", "tab\there", ""):
        with pytest.raises(VocabError, match="no tokenizer makes"):
            Vocabulary([*SPECIALS, bad])
