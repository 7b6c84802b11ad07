"""Looking at the results: captioned figures, the evaluation HTML gallery (checked in a real headless
Chromium), and training curves. Real photos and a small decoder trained on the shared 48-image cache."""
from __future__ import annotations

import base64
import json
import re
import os
import select
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stage2_decoder.reporting.curves as curves_mod
import stage2_decoder.reporting.gallery as gallery_mod
from stage2_decoder import plot, report
from stage2_decoder.reporting import figures

# --- helpers -----------------------------------------------------------------------------------------------


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def _png(path) -> Image.Image:
    """Open `path` as a PNG, verified to decode completely."""
    with Image.open(path) as im:
        assert im.format == "PNG", path
        im.verify()
    im = Image.open(path)
    im.load()
    return im


@pytest.fixture(scope="module")
def run_dir(shared_cache, tmp_path_factory):
    """A small decoder trained for a few (fast) epochs; 30% of the 48 images held out as the test split."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    out = tmp_path_factory.mktemp("figures") / "run"
    train(TrainConfig(features=str(shared_cache), out=str(out), epochs=8, scst_epochs=0, batch_size=32, lr=5e-3, embed_size=64,
                      hidden_size=128, vocab_threshold=2, test_frac=0.3, select_by="loss", device="cpu",
                      progress=False))
    return out


# --- captioned figures -------------------------------------------------------------------------------------

def test_figure_has_the_photo_on_top_and_a_text_band_of_the_computed_height(coco_records, tmp_path):
    rec = coco_records[0]
    alts = [("a man riding a horse", -0.41), ("a man on a horse", -0.52), ("a person riding a brown horse", -0.6)]
    out = figures.save_caption_figure(rec.path, alts[0][0], tmp_path / "fig.png", alts, label="x.jpg")
    im = _png(out).convert("RGB")
    with Image.open(rec.path) as src:
        w, h = src.size
    photo_h = round(640 * h / w)
    # one caption line (24 px), the beam header + 3 alternatives + the label (18 px each), 12 px padding twice
    assert im.size == (640, photo_h + 24 + 18 * 5 + 2 * 12)
    assert im.size == figures.figure_size((w, h), alts[0][0], alts, "x.jpg")
    # the top band is the photo itself, scaled to the figure's width
    with Image.open(rec.path) as src:
        want = np.asarray(src.convert("RGB").resize((640, photo_h), Image.Resampling.BILINEAR), dtype=float)
    got = np.asarray(im, dtype=float)[:photo_h]
    assert np.abs(got - want).mean() < 12
    # the text band is white with dark text on it
    band = np.asarray(im.convert("L"))[photo_h:]
    assert np.median(band) > 240 and band.min() < 80
    # greedy (no alternatives): just the caption and the label
    one = figures.save_caption_figure(rec.path, alts[0][0], tmp_path / "one.png", None, label="x.jpg")
    assert _png(one).size == (640, photo_h + 24 + 18 + 2 * 12)


def test_figure_text_is_plain_text_and_long_captions_wrap_inside_the_figure(coco_records, tmp_path):
    rec = coco_records[1]
    caption = "a $5 bill and $x^2$ on a table " + "with many more words " * 8  # '$' is not mathtext here
    longest = "W" * 120  # one "word" wider than the figure
    alts = [(caption, -1.0), (longest, -2.0)]
    out = figures.save_caption_figure(rec.path, caption, tmp_path / "f.png", alts)
    im = _png(out).convert("L")
    with Image.open(rec.path) as src:
        photo_h = min(640, round(640 * src.size[1] / src.size[0]))  # a portrait photo is capped
    text_h = im.size[1] - photo_h - 2 * 12
    assert im.size[0] == 640 and text_h > 3 * 24 + 4 * 18  # the caption and both alternatives wrapped
    band = np.asarray(im)[photo_h:]
    assert band[:, -6:].min() > 200  # nothing drawn into the right margin: no line runs off the figure
    assert band[:, :-6].min() < 80
    assert im.size == figures.figure_size(Image.open(rec.path).size, caption, alts)
    assert not list(tmp_path.glob("*.tmp"))


def test_figure_of_an_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(figures.FigureError, match="bad.jpg"):
        figures.save_caption_figure(bad, "x", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_fifo_named_as_a_photo_is_an_error_not_a_hang(tmp_path):
    """`report` (and `evaluate --html`) waited forever on a FIFO where an eval JSON named a photo."""
    import os
    import threading

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    got = []
    t = threading.Thread(target=lambda: got.append(_error_of(figures.load_display_image, fifo, 200)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "load_display_image blocked on a FIFO"
    assert isinstance(got[0], figures.FigureError) and "a FIFO, not a regular file" in str(got[0])


def test_a_display_image_over_the_pixel_limit_is_refused_as_the_captioner_refuses_it(tmp_path, monkeypatch):
    """Between 1x and 2x Pillow's limit an image was decoded whole after a warning; the captioner refuses it."""
    png, jpg = tmp_path / "big.png", tmp_path / "big.jpg"
    Image.new("RGB", (120, 100)).save(png)
    Image.new("RGB", (1600, 1200)).save(jpg)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # 12,000 px: over it, under twice it
    with pytest.raises(figures.FigureError, match="decompression-bomb limit"):
        figures.load_display_image(png, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_500_000)  # a JPEG is drafted to the size shown first
    assert max(figures.load_display_image(jpg, 64).size) == 64


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test looks at which
        return e
    return None


def test_figure_names_do_not_collide(tmp_path):
    taken: set[str] = set()
    names = [figures.figure_path(tmp_path, p, taken).name for p in ("a/cat.jpg", "b/cat.jpg", "cat.png", "dog.jpg")]
    assert names == ["cat.png", "cat-2.png", "cat-3.png", "dog.png"]


_CAPTION_IN_PROCESS = """
import json, sys
from click.testing import CliRunner
from stage2_decoder.caption import main
args = json.loads(sys.argv[1])
plain = CliRunner().invoke(main, args)
before = "matplotlib" in sys.modules
figs = CliRunner().invoke(main, args + json.loads(sys.argv[2]))
print(json.dumps({"plain": [plain.exit_code, plain.output], "figs": [figs.exit_code, figs.output],
                  "matplotlib_before": before, "matplotlib_after": "matplotlib" in sys.modules}))
"""


def test_caption_save_figure_writes_one_png_per_image_and_matplotlib_only_then(run_dir, coco_records, tmp_path):
    """`caption --save-figure DIR`: a PNG per image (same stem twice -> two files), alternatives listed
    when beam > 1; the captions printed are unchanged; without the option matplotlib is never imported."""
    test_keys = json.loads((run_dir / "split.json").read_text())["test"]
    by_key = {r.key: r for r in coco_records}
    a, b = by_key[test_keys[0]].path, by_key[test_keys[1]].path
    twin = tmp_path / "twin" / Path(a).name  # the same file name in another folder
    twin.parent.mkdir()
    shutil.copy(a, twin)
    out_dir = tmp_path / "figs"
    args = [a, b, str(twin), "--checkpoint", str(run_dir / "best.pt"), "--beam-size", "3", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("CAPCACHE_TEST_THREADS", "1"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _CAPTION_IN_PROCESS, json.dumps(args),
                           json.dumps(["--save-figure", str(out_dir)])], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["plain"][0] == 0 and res["figs"][0] == 0, res
    assert not res["matplotlib_before"] and res["matplotlib_after"]
    printed = [ln for ln in res["plain"][1].splitlines() if "\t" in ln]
    assert [ln.split("\t")[0] for ln in printed] == [a, b, str(twin)]
    assert [ln for ln in res["figs"][1].splitlines() if "\t" in ln] == printed  # same captions, same order
    stem = Path(a).stem
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([f"{stem}.png", f"{stem}-2.png",
                                                                 f"{Path(b).stem}.png"])
    for path, line in zip([out_dir / f"{stem}.png", out_dir / f"{Path(b).stem}.png"], printed):
        caption = line.split("\t")[1]
        with Image.open(line.split("\t")[0]) as src:
            size = src.size
        im = _png(path)
        greedy_size = figures.figure_size(size, caption, None, Path(path).name)
        # the beam's 3 alternatives and their header come on top of what a greedy figure has
        assert im.size[0] == 640 and im.size[1] >= greedy_size[1] + 4 * figures.SMALL_LINE
    assert _png(out_dir / f"{stem}-2.png").size == _png(out_dir / f"{stem}.png").size


# --- training curves ---------------------------------------------------------------------------------------

def test_training_writes_curves_png(run_dir):
    im = _png(run_dir / "curves.png")
    assert im.size == curves_mod.CURVES_SIZE
    assert len(plot.read_metrics(run_dir)) == 8
    # not a blank canvas: lines in several colours
    arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50


def test_plot_cli_redraws_a_run(cli, run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    (run / "curves.png").unlink()
    proc = _ok(cli("stage2_decoder.plot", run))
    assert "curves.png" in proc.stdout
    assert _png(run / "curves.png").size == curves_mod.CURVES_SIZE


def test_plot_during_a_run_takes_turns_with_the_runs_own_drawing(run_dir, tmp_path):
    """`plot` during a run: a drawing that read fewer epochs replaced the run's final curves.png after it, and a
    run starting in the folder deleted a live plot's temporary (the plot failed)."""
    import threading

    from common.lock import hold
    from stage2_decoder.training.loop import RUN_OUTPUTS

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    before = (run / "curves.png").stat().st_mtime_ns
    done = threading.Event()
    with hold(run / ".curves.png.lock", "curves"):  # another drawing of it is under way
        t = threading.Thread(target=lambda: (curves_mod.plot_run(run), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.5)  # waits its turn, and reads the metrics only then
        assert (run / "curves.png").stat().st_mtime_ns == before
    t.join(60)
    assert done.is_set() and (run / "curves.png").stat().st_mtime_ns != before
    # a drawer that never lets go (stopped with Ctrl-Z) is waited for a while, not for ever
    from common.lock import OutputBusy
    from stage2_decoder.training import loop

    with hold(run / ".curves.png.lock", "curves"):
        curves_mod.CURVES_WAIT_S, wait = 0.2, curves_mod.CURVES_WAIT_S
        try:
            with pytest.raises(OutputBusy, match="curves .* is in use by process"):
                curves_mod.plot_run(run)
            loop._plot(run)  # the end of training: a warning, the run still finishes
        finally:
            curves_mod.CURVES_WAIT_S = wait
    # a drawing's temporary is the drawing's to clean (under its lock), not a starting run's
    assert "curves.png" not in RUN_OUTPUTS
    (run / ".curves.png.killed.tmp").write_bytes(b"left by a killed plot")
    curves_mod.plot_run(run)
    assert not (run / ".curves.png.killed.tmp").exists()


def test_plot_older_metrics_without_cider_and_duplicate_epochs(tmp_path):
    lines = [{"epoch": 1, "train_loss": 4.0, "val_loss": 3.9, "val_perplexity": 49.4},
             {"epoch": 2, "train_loss": 3.0, "val_loss": 3.5, "val_perplexity": 33.1},
             {"epoch": 2, "train_loss": 2.9, "val_loss": 3.4, "val_perplexity": 30.0}]  # a re-run epoch: last wins
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [r["train_loss"] for r in plot.read_metrics(tmp_path)] == [4.0, 2.9]
    assert _png(curves_mod.plot_run(tmp_path)).size == curves_mod.CURVES_SIZE


def _one_error_line(result) -> str:
    """A CliRunner result of a user error: exit 1, no traceback, one 'error:' line on stderr."""
    assert result.exit_code == 1, (result.output, result.exception)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_plot_skips_numbers_that_are_not_finite_floats_and_marks_the_real_best(tmp_path):
    """NaN or `true` as epoch 1's val_cider marked "best.pt (epoch 1)"; an integer of 401 digits was an
    OverflowError traceback."""
    from stage2_decoder.reporting.curves import marked_best_epoch, plot_run

    rows = [{"epoch": 1, "val_cider": float("nan"), "train_loss": 10 ** 400}, {"epoch": 2, "val_cider": True},
            {"epoch": 3, "val_cider": 0.4, "train_loss": 3.0}, {"epoch": 4, "val_cider": 0.3, "train_loss": 2.9}]
    assert marked_best_epoch({}, rows) == 3
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items()}, allow_nan=True) + "\n" for r in rows))
    assert plot_run(run).stat().st_size > 0


def test_plot_marks_the_epoch_training_flagged_not_a_rounded_tie(shared_cache, tmp_path):
    """metrics.jsonl rounds val_cider to 4 places: 0.46358 (epoch 2) and 0.46361 (epoch 3, the one best.pt
    holds) both read 0.4636, and the earliest of a tie was marked. Training now flags the line."""
    from stage2_decoder.reporting.curves import marked_best_epoch, read_metrics
    from stage2_decoder.training.checkpoint import load_checkpoint
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    rows = [{"epoch": 1, "val_cider": 0.2, "best": True}, {"epoch": 2, "val_cider": 0.4636, "best": True},
            {"epoch": 3, "val_cider": 0.4636, "best": True}, {"epoch": 4, "val_cider": 0.41, "best": "yes"}]
    assert marked_best_epoch({}, rows) == 3
    assert marked_best_epoch({}, [{k: v for k, v in r.items() if k != "best"} for r in rows]) == 2  # old runs

    run = tmp_path / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=3, scst_epochs=0, batch_size=16,
                      embed_size=16, hidden_size=32, vocab_threshold=2, val_images=8, device="cpu", progress=False))
    records = read_metrics(run)
    assert any(r.get("best") is True for r in records)
    assert marked_best_epoch({}, records) == load_checkpoint(run / "best.pt")["epoch"]


def test_plot_refuses_what_is_neither_a_run_nor_a_sweep(tmp_path):
    from click.testing import CliRunner

    (tmp_path / "empty").mkdir()
    assert "neither a training run" in _one_error_line(CliRunner().invoke(plot.main, [str(tmp_path / "empty")]))
    assert "not a directory" in _one_error_line(CliRunner().invoke(plot.main, [str(tmp_path / "nope")]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert "no epochs" in _one_error_line(CliRunner().invoke(plot.main, [str(tmp_path / "run")]))


def test_plot_hands_a_sweep_directory_to_plot_sweep(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(curves_mod, "plot_sweep", lambda d: calls.append(Path(d)) or Path(d) / "sweep.png")
    (tmp_path / "results.csv").write_text("run,val_cider\n")
    assert plot.plot_path(tmp_path) == [tmp_path / "sweep.png"] and calls == [tmp_path]


def test_a_plotting_failure_does_not_fail_training(shared_cache, tmp_path, monkeypatch, capsys):
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    def broken(run_dir):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(curves_mod, "plot_run", broken)
    result = train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1, scst_epochs=0, embed_size=16,
                               hidden_size=32, vocab_threshold=2, device="cpu", progress=False, dry_run=True))
    assert result.epochs_run == 1 and (tmp_path / "run" / "best.pt").is_file()
    assert "warning: training curves not plotted: no fonts today" in capsys.readouterr().err


# --- the HTML gallery: structure ---------------------------------------------------------------------------

class _Cards(HTMLParser):
    """Collects the cards' data-cider, caption text and external references of a page."""

    def __init__(self):
        super().__init__()
        self.cards, self.captions, self.external, self.scripts = [], [], [], 0
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "card" in (a.get("class") or "").split():
            self.cards.append(float(a["data-cider"]))
        if tag == "p" and a.get("class") == "caption":
            self._in_caption = True
            self.captions.append("")
        if tag == "script":
            self.scripts += 1
        for k in ("src", "href"):
            if k in a and not (a[k] or "").startswith("data:"):
                self.external.append(a[k])

    def handle_endtag(self, tag):
        if tag == "p":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data


def test_report_orders_best_first_escapes_text_and_embeds_thumbnails(coco_records):
    recs = coco_records[:3]
    evil = '<script>alert("x")</script> & "quotes"'
    rep = {"metrics": {"BLEU-1": 0.5, "CIDEr": 0.25}, "notes": ["<b>note</b>"], "n_images": 4,
           "images": [{"key": recs[0].key, "image": recs[0].path, "caption": "worst", "references": ["r"], "cider": 0.1},
                      {"key": recs[1].key, "image": recs[1].path, "caption": evil, "references": [evil], "cider": 2.0},
                      {"key": "gone", "image": "/nonexistent/x.jpg", "caption": "no photo", "references": [],
                       "cider": None},
                      {"key": recs[2].key, "image": recs[2].path, "caption": "middle", "references": [], "cider": 0.9}]}
    page = gallery_mod.render_html(rep)
    p = _Cards()
    p.feed(page)
    assert p.cards == [2.0, 0.9, 0.1, -1.0]  # best -> worst; no score last
    assert p.captions == [evil, "middle", "worst", "no photo"]  # the text round-trips as text...
    assert p.scripts == 1 and "<b>note</b>" not in page  # ...and never becomes markup
    assert p.external == []  # no external assets: every src/href is a data: URI
    assert page.count("data:image/jpeg;base64,") == 3 and "image not readable" in page
    assert "<th>BLEU-1</th><th>CIDEr</th>" in page and "<td>0.250</td>" in page
    thumb = gallery_mod.thumbnail_data_uri(recs[0].path)
    with Image.open(__import__("io").BytesIO(base64.b64decode(thumb.split(",", 1)[1]))) as im:
        assert im.format == "JPEG" and max(im.size) == gallery_mod.THUMB_PX


# --- the HTML gallery in a real browser --------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in,
    fd 4 out, NUL-separated JSON), standard library only. Collects console errors and exceptions."""

    def __init__(self, exe: str, profile: Path, timeout: float = 60):
        self.timeout, self.events, self._buf, self._id = timeout, [], b"", 0
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def as_fds_3_and_4():  # in the child, before exec
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)
            os.set_inheritable(3, True)  # dup2 onto itself would keep close-on-exec
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=as_fds_3_and_4)  # our own fds are not inheritable (PEP 446)
        os.close(cmd_r)
        os.close(out_w)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._out_r], [], [], left)[0]:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def open(self, url: str, width: int, height: int) -> str:
        """A new page of width x height CSS px at scale 1 showing `url`, loaded; returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=sid)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        self.send("Page.navigate", {"url": url}, session=sid)
        self.wait_for("Page.loadEventFired")  # after every <img> (data: URIs) has loaded
        return sid

    def js(self, sid: str, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=sid)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors/assertions, uncaught exceptions and error log entries (CSP, failed loads) so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value")) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log ({p['entry']['source']}): {p['entry']['text']}")
        return out

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)


@pytest.fixture(scope="session")
def chromium_exe() -> str:
    """Debian's chromium; installed with apt-get here when missing and we are root (the CI case).
    CAPCACHE_NO_BROWSER_INSTALL=1 forbids the install; the browser tests then skip with the reason."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CAPCACHE_NO_BROWSER_INSTALL"):
        pytest.skip("chromium is not installed and CAPCACHE_NO_BROWSER_INSTALL is set")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get); "
                    "install it with: apt-get install chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode == 0:
            proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                                  capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium with apt-get took over 15 minutes")
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        pytest.skip(f"chromium could not be installed with apt-get (exit {proc.returncode}): {tail}")
    return found


@pytest.fixture
def browser(chromium_exe, tmp_path):
    b = Chromium(chromium_exe, tmp_path / "chromium-profile")
    yield b
    b.close()


def test_the_browser_check_catches_console_errors_and_external_loads(browser, tmp_path):
    """The harness itself: a page with a script error and a blocked external image is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                   "content=\"default-src 'none'; img-src data:; script-src 'unsafe-inline'\">"
                   '<link rel="icon" href="data:,"></head><body><img src="http://example.com/x.png">'
                   '<script>console.error("boom"); notDefined();</script></body></html>')
    browser.open(bad.as_uri(), 800, 600)
    problems = " / ".join(browser.problems())
    assert "console.error: boom" in problems and "notDefined" in problems and "Content Security Policy" in problems


_CARDS_JS = """Array.from(document.querySelectorAll('#cards .card')).map(c => ({
    cider: parseFloat(c.dataset.cider), caption: c.querySelector('.caption').innerText.trim(),
    refs: c.querySelectorAll('.refs li').length, visible: c.getBoundingClientRect().height > 0,
    img: (i => i ? i.complete && i.naturalWidth > 0 : false)(c.querySelector('img'))}))"""


def test_evaluate_html_gallery_in_a_real_browser(cli, run_dir, shared_cache, browser, tmp_path):
    """`evaluate --html`: loads from disk without console errors, one card per test image with a non-empty
    caption, a loaded photo and its references, best CIDEr first, re-sortable; a screenshot is taken."""
    page, js_out = tmp_path / "gallery" / "report.html", tmp_path / "eval.json"
    # without Java: PTB/METEOR cost ~30 s of JVM starts and are covered by test_quality; the page is the same
    no_java = tmp_path / "no-java-bin"
    no_java.mkdir()
    _ok(cli("stage2_decoder.evaluate", "--checkpoint", run_dir / "best.pt", "--features", shared_cache,
            "--split", "test", "--device", "cpu", "--json-out", js_out, "--html", page, env={"PATH": str(no_java)}))
    ev = json.loads(js_out.read_text())
    n = len(json.loads((run_dir / "split.json").read_text())["test"])
    assert n >= 10 and ev["n_images"] == n

    sid = browser.open(page.as_uri(), 1280, 900)
    cards = browser.js(sid, _CARDS_JS)
    assert browser.problems() == []
    assert len(cards) == n
    assert all(c["caption"] and c["img"] and c["refs"] >= 4 and c["visible"] for c in cards), cards
    scores = [c["cider"] for c in cards]
    assert scores == sorted(scores, reverse=True)
    want = sorted((i["cider"] for i in ev["images"]), reverse=True)
    # the per-image CIDEr evaluate computed, as the page keeps it (6 decimals); rounding both to 3 decimals
    # would fail on a value that the page's rounding carries over a third-decimal boundary
    assert len(scores) == len(want) and all(abs(s - w) <= 5.1e-7 for s, w in zip(scores, want)), (scores, want)
    assert {c["caption"] for c in cards} == {i["caption"] for i in ev["images"]}
    metric_heads = browser.js(sid, "Array.from(document.querySelectorAll('#metrics th')).map(t => t.innerText)")
    assert "CIDEr" in metric_heads and "BLEU-4" in metric_heads

    shot = tmp_path / "gallery.png"
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]))
    im = _png(shot)
    assert im.size == (1280, 900)
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 1000  # photos are on it

    # the order control re-sorts in the page, worst first, then back to evaluation order
    browser.js(sid, "(s => { s.value = 'worst'; s.dispatchEvent(new Event('change')); })"
                    "(document.getElementById('order'))")
    assert [c["cider"] for c in browser.js(sid, _CARDS_JS)] == sorted(scores)
    browser.js(sid, "(s => { s.value = 'index'; s.dispatchEvent(new Event('change')); })"
                    "(document.getElementById('order'))")
    assert [c["caption"] for c in browser.js(sid, _CARDS_JS)] == [i["caption"] for i in ev["images"]]
    assert browser.problems() == []


def test_report_takes_integer_keys_ranks_nan_as_unscored_and_refuses_numbers_no_float_holds(coco_records):
    """An integer key (which check_report allows) was an AttributeError in escape(); a NaN CIDEr sorted anywhere,
    so "the 2 best" left out the best; an integer of 401 digits was an OverflowError traceback."""
    from stage2_decoder.reporting.gallery import check_report, render_html, shown_images

    images = [{"key": i, "image": coco_records[0].path, "caption": "x", "references": ["y"], "cider": c}
              for i, c in enumerate([0.1, float("nan"), 0.9, 0.5, 0.2, 0.7])]
    shown, left = shown_images(images, 4)
    assert [i for i, _ in shown] == [2, 5, 0, 1] and left == 2  # 0.9, 0.7 best; 0.1 and the unscored worst
    assert 'alt="0"' in render_html({"metrics": {"CIDEr": 0.5}, "images": images[:1]})
    for doc, where in (({"metrics": {"CIDEr": 10 ** 400}, "images": []}, "metrics.CIDEr"),
                       ({"images": [{**images[0], "cider": 10 ** 400}]}, "images[0].cider"),
                       ({"images": [], "stats": {"vocab_used": 3, "distinct_fraction": 10 ** 400,
                                                 "most_common_fraction": 0.1, "most_common_caption": "a"}},
                        "stats.distinct_fraction")):
        with pytest.raises(ValueError, match=rf"r\.json: {re.escape(where)} is an integer of \d+ bits"):
            check_report(doc, "r.json")


def test_report_cli_rebuilds_the_gallery_from_evaluate_json(cli, coco_records, tmp_path):
    recs = coco_records[:2]
    ev = {"metrics": {"CIDEr": 0.5}, "n_images": 2,
          "images": [{"key": r.key, "image": r.path, "caption": f"caption {i}", "references": r.captions,
                      "cider": float(i)} for i, r in enumerate(recs)]}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    proc = _ok(cli("stage2_decoder.report", tmp_path / "eval.json", "--out", tmp_path / "r.html"))
    assert "2 images" in proc.stdout
    p = _Cards()
    p.feed((tmp_path / "r.html").read_text())
    assert p.captions == ["caption 1", "caption 0"]
    from click.testing import CliRunner

    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad, why in (("bad.json", "not an `evaluate --json`"), ("absent.json", "absent.json")):
        result = CliRunner().invoke(report.main, [str(tmp_path / bad), "--out", str(tmp_path / "b.html")])
        assert why in _one_error_line(result)
    assert not (tmp_path / "b.html").exists()


def test_report_with_a_name_that_is_not_utf8_an_infinite_score_or_a_relative_path(coco_records, tmp_path):
    """A name that is not UTF-8 (a lone surrogate) made the page unwritable after the whole evaluation; JSON's
    Infinity rendered as "CIDEr inf" and broke the page's re-sorting; a relative image path was looked up from
    the current folder, not the JSON's."""
    from click.testing import CliRunner

    (tmp_path / "img").mkdir()
    shutil.copy(coco_records[0].path, tmp_path / "img" / "a.jpg")
    item = {"key": "1", "image": "img/a.jpg", "caption": "a dog", "references": ["a dog"], "cider": 0.5}
    bad = {**item, "key": "2", "image": os.fsdecode(str(tmp_path).encode() + b"/bad\xff.jpg")}
    ev = {"metrics": {"CIDEr": 0.5}, "n_images": 2, "images": [item, bad]}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    r = CliRunner().invoke(report.main, [str(tmp_path / "eval.json"), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "bad\\xff.jpg" in page and page.count('src="data:image/') == 1  # the relative one found, from anywhere
    (tmp_path / "inf.json").write_text(json.dumps({**ev, "images": [{**item, "cider": float("inf")}]}))
    r = CliRunner().invoke(report.main, [str(tmp_path / "inf.json"), "--out", str(tmp_path / "i.html")])
    assert "images[0].cider is inf, expected a finite number" in _one_error_line(r)
    r = CliRunner().invoke(report.main, [str(tmp_path / "eval.json"), "--out", str(tmp_path / "eval.json")])
    assert "is the evaluation report it is made from" in _one_error_line(r)
    assert json.loads((tmp_path / "eval.json").read_text()) == ev
