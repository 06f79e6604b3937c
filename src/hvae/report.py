"""`hvae report RUN_DIR`: one self-contained HTML page about a trained run (images embedded as base64 PNG).

Sections (their element ids): config, evaluation, sample-quality, samples, reconstructions, interpolations, latent-views,
training-curves. No scripts, no external files: the page renders offline from a single file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import editing, plots, sample_quality
from .config import ConfigError, to_dict
from .data import CLASS_NAMES, test_set
from .evaluate import ACTIVE_THRESHOLD, evaluate
from .protocol import DiffusionModel
from .visualize import png_bytes, rows, to_unit_range

SECTIONS = (("evaluation", "Evaluation"), ("sample-quality", "Sample quality"), ("samples", "Samples"), ("reconstructions", "Reconstructions"),
            ("interpolations", "Interpolations"), ("latent-views", "Latent views"),
            ("training-curves", "Training curves"), ("config", "Configuration"))
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left;font-size:.9em}figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555}img{max-width:100%;image-rendering:pixelated}.note{color:#777}"""


@dataclass
class ReportOptions:
    """What the report evaluates and draws: k and limit feed `evaluate` (small by default, for speed)."""

    k: int = 100
    limit: int = 1000
    n_samples: int = 64
    temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    ema: bool = True
    tsne: bool = False
    progress: bool = False


def build_report(run_dir: str | Path, out: str | Path | None = None, options: ReportOptions | None = None) -> Path:
    """Write the HTML report of run_dir to `out` (default RUN_DIR/report.html) and return its path."""
    opt = options or ReportOptions()
    run_dir = Path(run_dir)
    if opt.k < 1 or opt.limit < 1 or opt.n_samples < 1:
        raise ConfigError(f"k, limit and n_samples must be >= 1; got {opt.k}, {opt.limit}, {opt.n_samples}")
    if opt.tsne:
        editing.tsne_class()  # fail before the slow parts when scikit-learn is missing
    model = ckpt.load(run_dir, opt.device, ema=opt.ema)
    cfg = ckpt.read_config(run_dir)
    x, y = test_set(cfg.data.dataset, opt.data_dir or cfg.data.data_dir, cfg.model.likelihood)
    x, y = x[: opt.limit], None if y is None else y[: opt.limit]
    show = partial(to_unit_range, likelihood=cfg.model.likelihood)  # likelihood means -> [0, 1]
    result = evaluate(model, x, k=opt.k, device=opt.device, progress=opt.progress, seed=opt.seed)
    if isinstance(model, DiffusionModel):  # latents of the data's shape: no latent code to interpolate or project
        code = [_section("interpolations", _note("a diffusion model has no latent code to interpolate")),
                _section("latent-views", _note("a diffusion model's latents z_t have the data's shape: see the "
                                               "denoising chain under Samples"))]
    else:
        code = [_interpolation_section(model, x, show),
                _latent_section(model, x, y, CLASS_NAMES.get(cfg.data.dataset), opt, show)]
    # The headline figures and samples first; the configuration tables, folded, at the end.
    body = [_headline(result, run_dir), _evaluation_section(result), _quality_section(run_dir),
            _samples_section(model, opt, show),
            _reconstruction_section(model, x, show), *code, _curves_section(run_dir / "metrics.jsonl"),
            _config_section(cfg, run_dir)]
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.atomic_file(out) as f:  # an interrupted report leaves no half-written page
        f.write(_page(f"hvae report: {run_dir.name}", body).encode("utf-8"))
    return out


# -- page pieces -----------------------------------------------------------------------------------------

def _page(title: str, body: list[str]) -> str:
    nav = " ".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>'
            f"<nav>{nav}</nav>\n" + "\n".join(body) + "\n</body></html>\n")


def _section(sid: str, *parts: str) -> str:
    name = dict(SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{html.escape(name)}</h2>\n' + "\n".join(parts) + "</section>"


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _plot(fn: Callable[..., Any], *args, **kwargs) -> bytes:
    buf = io.BytesIO()
    fn(*args, buf, **kwargs)
    return buf.getvalue()


def _table(items: dict[str, Any], header: tuple[str, str] = ("key", "value"), exact: bool = False) -> str:
    """exact: values as given (a config); else floats to 4 decimals (metrics)."""
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v, exact))}</td></tr>"
                    for k, v in items.items())
    return f"<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>{cells}</table>"


def _fmt(value: Any, exact: bool = False) -> str:
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, exact) for v in value) + "]"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# -- sections --------------------------------------------------------------------------------------------

def _config_section(cfg, run_dir: Path) -> str:
    parts = [f"<h3>{name}</h3>" + _table(values, exact=True) for name, values in to_dict(cfg).items()]
    prov = run_dir / "provenance.json"
    if prov.is_file():
        info = ckpt.read_json(prov)
        keep = ("hvae", "torch", "git_commit", "cpu", "gpu", "command")
        parts.append("<h3>provenance</h3>" + _table({k: info.get(k) for k in keep if k in info}, exact=True))
    return _section("config", "<details><summary>the resolved config and the provenance of the run</summary>",
                    *parts, "</details>")


def _headline(result: dict[str, Any], run_dir: Path) -> str:
    """The figures a reader looks for first, and how to walk the run's latent space live (hvae explore)."""
    if "elbo_se" in result:
        bound = f"VLB {-result['elbo']:.2f} ± {result['elbo_se']:.2f} nats (a one-sample bound)"
    else:
        bound = f"IW-NLL {result['iw_nll']:.2f} nats (k = {result['k']}), -ELBO {-result['elbo']:.2f}"
    units = f", {result['active_units']} active units" if "active_units" in result else ""
    text = f"{bound}, {result['bits_per_dim']:.4f} bits/dim on {result['n_images']} test images{units}."
    explore = f"Walk this run's latent space live: hvae explore {run_dir}, then open http://127.0.0.1:8765/"
    return f'<p class="headline"><b>{html.escape(text)}</b></p>' + _note(explore)


def _evaluation_section(result: dict[str, Any]) -> str:
    text = f"Means over the first {result['n_images']} test images, nats unless named"
    text += f"; iw_nll uses k = {result['k']} importance samples." if "k" in result else "."
    if "elbo_se" in result:
        text += (f" elbo is a one-sample variational bound (one draw per image and pass), the mean of "
                 f"{result['passes']} passes with its standard error elbo_se; it is not an IW-NLL.")
    return _section("evaluation", f"<p>{html.escape(text)}</p>", _table(result, ("metric", "value")))


def _quality_section(run_dir: Path) -> str:
    """The figures `hvae eval --fid` appended to the run's sample-quality.jsonl: the latest row per temperature and
    per reference, and the curve against temperature."""
    path = run_dir / sample_quality.RECORDS
    samples, refs = sample_quality.latest_by_temperature(plots.read_metrics(path) if path.is_file() else [])
    if not samples:
        return _section("sample-quality", _note(f"not measured: hvae eval {run_dir} --fid-only "
                                                "--temperature 0.7,0.8,0.9,1.0 adds it"))
    keys = ("fid", "kid", "kid_se", "precision", "recall", "n")
    head = "<tr><th>images</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    rows = [(f"samples, temperature {r['temperature']:g}", r) for r in samples]
    rows += [(f"reference: {name}", r) for name, r in refs.items()]
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>"
                   for name, r in rows)
    text = (f"Against all test images, on the features of {samples[-1].get('features', 'a LeNet of the data set')} "
            "(a Fréchet distance on this network, not comparable with Inception FID). Reference rows: training "
            "images (the floor) and the model's reconstructions of the test images.")
    figs = [_figure(_plot(plots.plot_sample_quality, samples, refs), "against sampling temperature")] \
        if len(samples) > 1 else []
    return _section("sample-quality", f"<p>{html.escape(text)}</p><table>{head}{body}</table>", *figs)


def _samples_section(model, opt: ReportOptions, show) -> str:
    torch.manual_seed(opt.seed)
    with torch.no_grad():
        images = model.sample(opt.n_samples, opt.temperature)
        chain = model.denoising_chain(8, frames=10, temperature=opt.temperature) \
            if isinstance(model, DiffusionModel) else None
    caption = f"{opt.n_samples} samples, temperature {opt.temperature} (means of p(x|z))"
    figs = [_figure(png_bytes(show(images), nrow=8), caption)]
    if chain is not None:
        figs.append(_figure(png_bytes(show(chain.flatten(0, 1)), nrow=10),
                            "the denoising chain: the predicted x from t = 1 (left) to t = 0 (right), one sample a row"))
    return _section("samples", *figs)


def _reconstruction_section(model, x, show, n: int = 16) -> str:
    xs = x[:n].to(editing.model_device(model))
    with torch.no_grad():
        recon = model.reconstruct(xs) if isinstance(model, DiffusionModel) else \
            editing.decode_means(model, editing.encode_means(model, xs))
    pairs = torch.stack([xs, recon], 1).flatten(0, 1)  # [2n, *data]: image, reconstruction, ...
    return _section("reconstructions", _figure(png_bytes(show(pairs), nrow=4),
                                               "test image | reconstruction from E_q[z|x], two pairs a row"))


def _interpolation_section(model, x, show, n: int = 4, steps: int = 10) -> str:
    if len(x) < 2:
        return _section("interpolations", _note("needs at least two test images"))
    n = min(n, len(x) // 2)
    a, b = x[:n].to(editing.model_device(model)), x[n:2 * n].to(editing.model_device(model))
    figs = []
    for spherical in (False, True):
        path = editing.interpolate(model, a, b, steps, spherical)  # [n, steps, *data]
        grid, nrow = rows(torch.cat([a[:, None], path, b[:, None]], 1))
        figs.append(_figure(png_bytes(show(grid), nrow=nrow),
                            f"{'spherical' if spherical else 'linear'}: test image, {steps} decoded steps, test image"))
    return _section("interpolations", *figs)


def _latent_section(model, x, y, class_names, opt: ReportOptions, show) -> str:
    """KL per unit, a 2-d view of the level-1 posterior means (+ the manifold for 2-d latents), a traversal."""
    kl = editing.kl_per_dimension(model, x)
    active = [v.numpy() > ACTIVE_THRESHOLD for v in editing.posterior_mean_variance(model, x)]
    figs = [_figure(_plot(plots.plot_kl_per_dimension, [k.numpy() for k in kl], active=active),
                    "mean KL per latent dimension (grey: inactive, Cov_x E_q[z_u] <= 0.01)")]
    means = editing.encode_means(model, x).cpu()  # [N, *event], level 1
    figs += _projection_figures(means.flatten(1).numpy(), None if y is None else y.numpy(), class_names, opt)
    if means[0].numel() == 2:
        grid = show(editing.manifold_grid(model, means.shape[1:], 15)).cpu().numpy()  # [15, 15, *data]
        figs.append(_figure(_plot(plots.plot_manifold, grid, editing.manifold_values(15).numpy()),
                            "decoder means over the 2-d latent plane (z at prior quantiles 5%..95%)"))
    dims = torch.argsort(kl[0], descending=True, stable=True)[:8].tolist()
    grid, nrow = rows(editing.traverse(model, means[0], dims, torch.linspace(-3, 3, 9)))  # [len(dims) * 9, *data]
    figs.append(_figure(png_bytes(show(grid), nrow=nrow),
                        f"traversal from test image 0: rows are dimensions {dims} (highest KL first), "
                        "z_d from -3 to 3"))
    return _section("latent-views", *figs)


def _projection_figures(flat, labels, class_names, opt: ReportOptions) -> list[str]:
    """Posterior means [N, D] as points: the latent itself when D = 2, else PCA; t-SNE when asked."""
    scatter = partial(_plot, plots.plot_latent_projection, labels=labels, class_names=class_names)
    if flat.shape[1] == 2:
        figs = [_figure(scatter(flat, title="posterior means (the 2-d latent itself)", axis_labels=("z_1", "z_2")),
                        "posterior means of the test images, coloured by label")]
    else:
        proj, ratio = editing.principal_components(flat, 2)
        share = f"{100 * ratio.sum():.0f}% of their variance"
        figs = [_figure(scatter(proj, title=f"PCA of posterior means ({share})",
                                axis_labels=(f"PC 1 ({100 * ratio[0]:.0f}%)", f"PC 2 ({100 * ratio[1]:.0f}%)")),
                        f"PCA: posterior means of the test images on their first two principal components ({share})")]
    if opt.tsne:
        figs.append(_figure(scatter(editing.tsne_2d(flat, opt.seed), title="t-SNE of posterior means",
                                    axis_labels=("t-SNE 1", "t-SNE 2")), "t-SNE of the posterior means"))
    return figs


def _curves_section(path: Path) -> str:
    if not path.is_file():
        return _section("training-curves", _note(f"{path.name} is missing: no training curves"))
    records = plots.read_metrics(path)
    return _section("training-curves", _figure(_plot(plots.plot_training_curves, records),
                                               f"from {path.name}: {len(records)} records"))
