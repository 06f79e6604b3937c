"""Plots and the HTML report: each plot writes a PNG; `hvae report` holds every section and renders in
headless Chromium without console errors."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hvae.cli import main
from hvae.data import DataError
from hvae.plots import (plot_kl_per_dimension, plot_latent_projection, plot_manifold, plot_training_curves,
                        read_metrics)
from hvae.report import SECTIONS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_SRC = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def assert_png(data: bytes, min_size: tuple[int, int] = (50, 50)) -> None:
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.width >= min_size[0] and img.height >= min_size[1]
        assert np.asarray(img.convert("L")).std() > 0  # not a blank canvas


def test_training_curves_png_with_levels_and_without_step_records(tmp_path):
    records = [{"step": s, "epoch": s / 10, "loss": 100 - s, "elbo": s - 100, "reconstruction": s - 90,
                "kl": 10.0, "kl_per_level": [6.0, 4.0]} for s in range(1, 11)]
    records.append({"step": 10, "epoch": 1, "train_elbo": -95.0, "train_kl": 10.0, "val_elbo": -97.0})
    for name, recs in (("levels.png", records), ("epochs_only.png", records[-1:]), ("empty.png", [])):
        out = plot_training_curves(recs, tmp_path / name)
        assert_png(Path(out).read_bytes())


def test_kl_bars_projection_and_manifold_pngs(tmp_path):
    rng = np.random.default_rng(0)
    out = plot_kl_per_dimension([rng.random(8), rng.random(3)], tmp_path / "kl.png",
                                active=[rng.random(8) > 0.5, np.ones(3, bool)])
    assert_png(Path(out).read_bytes())
    labels = rng.integers(0, 4, 100)
    for name, lab in (("labelled.png", labels), ("unlabelled.png", None)):
        out = plot_latent_projection(rng.normal(size=(100, 2)) + labels[:, None], tmp_path / name, labels=lab,
                                     class_names=["a", "b", "c", "d"])
        assert_png(Path(out).read_bytes())
    buf = io.BytesIO()  # file objects work too (the report uses them)
    plot_manifold(rng.random((5, 5, 1, 6, 6)), np.linspace(-1.5, 1.5, 5), buf)
    assert_png(buf.getvalue())


def test_read_metrics_drops_a_torn_last_line_and_refuses_a_damaged_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="line 2"):
        read_metrics(path)
    with pytest.raises(DataError, match="missing"):
        read_metrics(tmp_path / "nope.jsonl")


def make_report(idx_dir: Path, tmp_path: Path, latent_dim: int) -> Path:
    run, out = tmp_path / "run", tmp_path / "report" / "index.html"
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "1", "--set", "model.hidden=[32]",
                 "--set", f"model.latent_dim={latent_dim}", "--set", "train.log_every=2", "--batch-size", "32",
                 "--no-progress", "--out", str(run)]) == 0
    assert main(["report", str(run), "--k", "5", "--limit", "48", "--n", "16", "--no-progress",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("latent_dim", [2, 4])
def test_report_holds_every_section_with_embedded_images(idx_dir, tmp_path, capsys, latent_dim):
    out = make_report(idx_dir, tmp_path, latent_dim)
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text(encoding="utf-8")
    for sid, heading in SECTIONS:
        assert f'<section id="{sid}"><h2>{heading}</h2>' in page, sid
        assert f'href="#{sid}"' in page
    sections = {sid: page.split(f'<section id="{sid}">')[1].split("</section>")[0] for sid, _ in SECTIONS}
    for sid in ("samples", "reconstructions", "interpolations", "latent-views", "training-curves"):
        assert IMG_SRC.search(sections[sid]), f"no image in {sid}"
    # 2-d latents: KL bars, the latent scatter, the manifold, a traversal; else PCA instead of scatter + manifold
    assert len(IMG_SRC.findall(sections["latent-views"])) == (4 if latent_dim == 2 else 3)
    assert ("decoder means over the 2-d latent plane" in page) == (latent_dim == 2)
    assert ("PCA: posterior means" in page) == (latent_dim != 2)
    for encoded in IMG_SRC.findall(page):
        assert_png(base64.b64decode(encoded), min_size=(20, 20))
    assert "<td>iw_nll</td>" in sections["evaluation"] and "<td>k</td><td>5</td>" in sections["evaluation"]
    assert f"<td>latent_dim</td><td>{latent_dim}</td>" in sections["config"]
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # self-contained: nothing fetched from elsewhere
    assert "<script" not in page


def test_report_of_a_missing_run_is_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- the page in a real browser --------------------------------------------------------------------------

def chromium(tmp_path: Path):
    """A headless Chromium driven by selenium: skipped when missing, except under CI=true where it fails."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if webdriver is None or not binary or not driver:
        missing = "selenium" if webdriver is None else "chromium" if not binary else "chromedriver"
        message = f"{missing} is missing (make browser installs chromium + chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def console_errors(browser) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_report_renders_in_headless_chromium_without_console_errors(idx_dir, tmp_path):
    browser = chromium(tmp_path)  # first: a missing browser skips (or fails) before any training
    try:
        out = make_report(idx_dir, tmp_path, latent_dim=2)
        # The harness sees console errors at all: a page that logs one must be caught.
        control = tmp_path / "control.html"
        control.write_text('<!DOCTYPE html><html><body><script>console.error("boom")</script></body></html>')
        browser.get(control.as_uri())
        assert any("boom" in m for m in console_errors(browser))

        browser.get(out.as_uri())
        assert browser.execute_script("return document.readyState") == "complete"
        assert console_errors(browser) == []
        headings = browser.execute_script(
            "return Array.from(document.querySelectorAll('section > h2'), h => [h.parentElement.id, h.textContent])")
        assert headings == [list(s) for s in SECTIONS]
        images = browser.execute_script(
            "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])")
        assert len(images) >= 9
        assert all(done and natural > 0 and shown > 0 for done, natural, shown in images), json.dumps(images)
    finally:
        browser.quit()


def test_config_values_are_shown_exactly_not_rounded(tmp_path):
    from hvae.config import Config, apply
    from hvae.report import _config_section

    cfg = apply(Config(), {"optim.lr": 3e-5, "optim.ema": 0.99995, "objective.free_bits": 1e-5})
    page = _config_section(cfg, tmp_path)
    for shown in ("<td>lr</td><td>3e-05</td>", "<td>ema</td><td>0.99995</td>", "<td>free_bits</td><td>1e-05</td>"):
        assert shown in page
