"""`hvae explore RUN`: a local web page to walk a trained model's latent space live (issue 17).

The write-up: "latent vectors can be edited before being passed to the decoder to more precisely control the data
generated". Here the editing is a slider: the page (explorer/index.html, one file, no build step, nothing fetched
from elsewhere) keeps a latent z and asks this server for pictures of E[x | z], each made by the library function a
CLI command would call (editing.encode_means / decode_means / lerp / slerp, the model's sample, resample_lower,
denoising_chain). Sliders: one per latent unit when D <= 16, else one per principal direction of the test set's
posterior means (the top 16), in standard deviations along it.

API (GET /api/info; POST /api/<endpoint> with a JSON object; a PNG or JSON back; errors: 4xx + {"error": "..."}):
    decode       {z: [D]} | {sliders: [K]}                                  -> PNG
    random       {temperature, seed}                                        -> {z, sliders, image}
    encode       {index} | {pixels: [H*W] in [0, 1]}                        -> {z, sliders, input, reconstruction}
    interpolate  {a, b, method: linear | spherical, position in [0, 1]}     -> PNG
    attribute    {z | sliders | index, to, from, strength}                  -> PNG of z + strength (mean_to - mean_from)
    levels       {index | pixels, keep, temperature, seed, samples}         -> PNG row (hierarchical models)
    chain        {frames, steps, temperature, seed}                         -> {frames: [PNG data URLs]} (diffusion)
    images       {start, count}                                             -> {start, images, labels}

The server is the standard library's (http.server): requests are parsed on their own threads, and one decoding
thread takes whatever is queued and decodes it as one batch. It reads the run directory once and never writes.
"""
from __future__ import annotations

import base64
import json
import queue
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from .editing import decode_means, encode_means, lerp, slerp
from .errors import ConfigError, InputError
from .models.vdm import SAMPLE_STEPS
from .protocol import DiffusionModel
from .visualize import png_bytes, to_unit_range

MAX_SLIDERS = 16  # one slider per unit up to this latent size, else one per principal direction (the top 16)
LIMIT = 100.0  # |latent value| and |slider value| accepted (slider values in standard deviations)
MAX_BATCH = 256  # decodes per batch
MAX_BODY = 1 << 20  # bytes of JSON per request
TIMEOUT = 120.0  # seconds a request waits for its result


class RequestError(Exception):
    """A bad request: answered with `status` and a one-line JSON message, {"error": ...}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(" ".join(message.split()))
        self.status = status


class Body:
    """A request's JSON object, read field by field with its range checked; unknown keys are refused."""

    def __init__(self, raw: Any, allowed: set[str]):
        if not isinstance(raw, dict):
            raise RequestError(f"the request body must be a JSON object; got {type(raw).__name__}")
        unknown = sorted(set(raw) - allowed - {"run"})
        if unknown:
            takes = ", ".join(sorted(allowed)) or "no keys"
            raise RequestError(f"unknown key {unknown[0]!r}; this endpoint takes {takes}")
        self.raw = raw

    def one_of(self, *keys: str) -> str:
        given = [k for k in keys if k in self.raw]
        if len(given) != 1:
            raise RequestError(f"give exactly one of {', '.join(keys)}; got {', '.join(given) or 'none'}")
        return given[0]

    def number(self, key: str, lo: float, hi: float, default: float | None = None) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{key} must be a number in [{lo:g}, {hi:g}]; got {json.dumps(value)}")
        if not lo <= value <= hi:  # also refuses NaN
            raise RequestError(f"{key} is out of range: must be in [{lo:g}, {hi:g}]; got {value!r}")
        return float(value)

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{key} must be an integer in {lo}..{hi}; got {json.dumps(value)}")
        if not lo <= value <= hi:
            raise RequestError(f"{key} is out of range: must be in {lo}..{hi}; got {value}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.raw.get(key, options[0])
        if value not in options:
            raise RequestError(f"{key} must be one of {', '.join(options)}; got {json.dumps(value)}")
        return value

    def vector(self, key: str, size: int, lo: float, hi: float, what: str) -> Tensor:
        value = self.raw[key]
        if not isinstance(value, list) or len(value) != size:
            got = f"{len(value)} value(s)" if isinstance(value, list) else json.dumps(value)[:40]
            raise RequestError(f"{key} must be a list of {size} numbers ({what}); got {got}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi for v in value):
            raise RequestError(f"{key} is out of range: every value must be a number in [{lo:g}, {hi:g}]")
        return torch.tensor(value, dtype=torch.float64)


@dataclass
class Job:
    """Work for the decoding thread: `latent` (-> z [*event]) joins the next batch decode; `run` runs alone."""

    latent: Callable[[], Tensor] | None = None
    run: Callable[[], Any] | None = None
    done: Future = field(default_factory=Future)


def principal_directions(z: np.ndarray) -> dict[str, np.ndarray]:
    """PCA of posterior means by SVD of the centred data (editing.principal_components'): z [N, D] -> the mean [D],
    directions [K, D] (rows), the projections' standard deviations [K] and explained variance ratios [K]."""
    mean = z.mean(0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    total = (s ** 2).sum()
    sd = s / np.sqrt(len(z))
    return {"mean": mean, "directions": vt, "sd": np.where(sd > 0, sd, 1.0),
            "explained_variance": (s ** 2) / total if total > 0 else np.zeros_like(s)}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded for one job and restored after it (only the decoding thread draws from it)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class Explorer:
    """One model, its test images x [N, *data] (model input space) and their posterior means; the API's endpoints
    (`handle`) and the decoding thread (`start`, `close`)."""

    def __init__(self, model, x: Tensor, labels: Tensor | None = None, likelihood: str = "bernoulli",
                 class_names=None, name: str = "run"):
        self.model, self.x, self.likelihood, self.name = model.eval(), x.cpu(), likelihood, name
        self.device = next(model.parameters()).device
        self.labels = None if labels is None else labels[: len(x)].cpu()
        self.diffusion = isinstance(model, DiffusionModel)
        self.levels = getattr(model, "n_levels", 1) if hasattr(model, "resample_lower") else 1
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.lock = threading.Lock()  # held while a batch runs
        self.threads = torch.get_num_threads()  # the decoding thread's intra-op threads: those of its creator
        self.submitted, self.batches, self.largest_batch, self._count = 0, 0, 0, threading.Lock()
        self.info: dict[str, Any] = {"run": name, "model": getattr(getattr(model, "config", None), "name", None),
                                     "likelihood": likelihood, "data_shape": list(x.shape[1:]), "test_images": len(x),
                                     "diffusion": self.diffusion, "levels": self.levels}
        if self.diffusion:
            self.info["chain"] = {"steps": model.timesteps or SAMPLE_STEPS, "max_frames": 64}
            return
        with torch.no_grad():
            self.means = encode_means(model, x.to(self.device)).cpu()  # [N, *event], E_q[z_1 | x]
        self.event = self.means.shape[1:]
        flat = self.means.flatten(1).double().numpy()
        self.pca = principal_directions(flat)
        size = flat.shape[1]
        self.k = min(MAX_SLIDERS, len(self.pca["sd"])) if size > MAX_SLIDERS else size
        pca = {key: v[: self.k].tolist() for key, v in self.pca.items() if key != "mean"}
        pca["explained_variance"] = self.pca["explained_variance"].tolist()  # of every direction
        self.info.update(latent_size=size, level_sizes=list(getattr(model, "latent_dims", [size])),
                         sliders={"kind": "pca" if size > MAX_SLIDERS else "dims", "count": self.k, "range": [-3, 3]},
                         pca={"mean": self.pca["mean"].tolist(), **pca}, classes=self._classes(class_names))

    def _classes(self, names) -> dict | None:
        if self.labels is None:
            return None
        present = sorted(self.labels.unique().tolist())
        self.class_means = {c: self.means[self.labels == c].mean(0) for c in present}  # as editing.attribute_vector
        return {"labels": present, "names": [names[c] if names and c < len(names) else str(c) for c in present],
                "means": [self.class_means[c].flatten().tolist() for c in present]}

    # -- the decoding thread ----------------------------------------------------------------------------------

    def start(self) -> Explorer:
        self.thread = threading.Thread(target=self._work, name="hvae-explore-decoder", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        if getattr(self, "thread", None) is not None:
            self.queue.put(None)
            self.thread.join(timeout=TIMEOUT)

    def submit(self, job: Job) -> Any:
        """Queue a job and wait for its result (its exception is raised here, in the request's thread)."""
        with self._count:
            self.submitted += 1
        self.queue.put(job)
        return job.done.result(timeout=TIMEOUT)

    def _work(self) -> None:
        # A new thread's OpenMP pool is the default size, not the process's setting; on a busy machine a pool larger
        # than needed made each decode wait for descheduled threads (0.1 ms -> 24 ms, measured).
        torch.set_num_threads(self.threads)
        while True:
            jobs = [self.queue.get()]
            with self.lock:
                while len(jobs) < MAX_BATCH:  # everything that arrived meanwhile joins this batch
                    try:
                        jobs.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                with torch.no_grad():  # grad mode is per thread
                    self._run([j for j in jobs if j is not None])
            if None in jobs:
                return

    def _run(self, jobs: list[Job]) -> None:
        batch = []
        for job in (j for j in jobs if j.latent is not None):
            try:
                batch.append((job, job.latent().to(self.device, torch.float32)))
            except Exception as e:  # noqa: BLE001 -- handed to the request's thread, which answers it
                job.done.set_exception(e)
        if batch:
            self.batches, self.largest_batch = self.batches + 1, max(self.largest_batch, len(batch))
            try:
                images = to_unit_range(decode_means(self.model, torch.stack([z for _, z in batch])), self.likelihood)
                for (job, z), image in zip(batch, images.cpu()):  # [B, *data]
                    job.done.set_result((z.cpu(), image))
            except Exception as e:  # noqa: BLE001
                for job, _ in batch:
                    job.done.set_exception(e)
        for job in (j for j in jobs if j.run is not None):
            try:
                job.done.set_result(job.run())
            except Exception as e:  # noqa: BLE001
                job.done.set_exception(e)

    # -- the endpoints: JSON in, PNG or JSON out -----------------------------------------------------------------

    def handle(self, endpoint: str, raw: Any) -> tuple[str, bytes]:
        """(content type, body) of POST /api/<endpoint>; RequestError for a bad request."""
        method = getattr(self, f"api_{endpoint}", None) if endpoint.isidentifier() else None
        if method is None:
            endpoints = ", ".join(name[4:] for name in dir(self) if name.startswith("api_"))
            raise RequestError(f"unknown endpoint /api/{endpoint}; POST to one of {endpoints} (GET /api/info)", 404)
        if isinstance(raw, dict) and raw.get("run", self.name) != self.name:
            raise RequestError(f"unknown run {json.dumps(raw['run'])}; this server explores {json.dumps(self.name)}",
                               404)
        if self.diffusion != (endpoint == "chain") and endpoint != "images":
            raise RequestError("a diffusion model's latents have the data's shape: use /api/chain" if self.diffusion
                               else "/api/chain is for diffusion models; this model has a latent code")
        result = method(raw)
        return ("image/png", result) if isinstance(result, bytes) else \
            ("application/json", json.dumps(result).encode())

    def api_decode(self, raw) -> bytes:
        """{"z": [D]} or {"sliders": [K]} -> PNG of E[x | z]."""
        return self._png(self._decode(self._latent(Body(raw, {"z", "sliders"}))))

    def api_random(self, raw) -> dict:
        """{"temperature": t, "seed": s} -> z_1 of one draw of model.sample(1, t) (seeded), its sliders, its image."""
        b = Body(raw, {"temperature", "seed"})
        temperature, seed = b.number("temperature", 0, 5, 1.0), b.integer("seed", 0, 2**32 - 1, 0)
        return self._latent_json(*self._decode(lambda: self._prior_latent(temperature, seed)))

    def api_encode(self, raw) -> dict:
        """{"index": i} or {"pixels": [H*W] in [0, 1]} -> E_q[z_1 | x], its sliders, the input, its reconstruction."""
        x = self._image(Body(raw, {"index", "pixels"}))
        out = self._latent_json(*self._decode(lambda: encode_means(self.model, x.to(self.device))[0]))
        return {**out, "input": data_url(png_bytes(to_unit_range(x, self.likelihood), nrow=1, scale=1)),
                "reconstruction": out.pop("image")}

    def api_interpolate(self, raw) -> bytes:
        """{"a": i, "b": j, "method": "linear" | "spherical", "position": t} -> PNG of the decoded path at t."""
        b = Body(raw, {"a", "b", "method", "position"})
        xa, xb = (self.x[i:i + 1] for i in (b.integer(k, 0, len(self.x) - 1) for k in ("a", "b")))
        path = slerp if b.choice("method", ("linear", "spherical")) == "spherical" else lerp
        t = torch.tensor([b.number("position", 0, 1)])

        def latent():  # as editing.interpolate: each end's posterior mean, then the path at t
            za, zb = (encode_means(self.model, x.to(self.device)) for x in (xa, xb))  # [1, *event]
            return path(za.flatten(1), zb.flatten(1), t.to(za))[0, 0].reshape(self.event)
        return self._png(self._decode(latent))

    def api_attribute(self, raw) -> bytes:
        """{"z" | "sliders" | "index", "to": A, "from": B, "strength": s} -> PNG of z + s (mean_A - mean_B)."""
        b = Body(raw, {"z", "sliders", "index", "to", "from", "strength"})
        if self.labels is None:
            raise RequestError("attribute vectors need class labels, and this run's test set has none")
        to, frm = (b.integer(k, 0, 2**31) for k in ("to", "from"))
        for c in (to, frm):
            if c not in self.class_means:
                raise RequestError(f"class {c} is out of range; classes present: {sorted(self.class_means)}")
        z, s = self._latent(b, ("z", "sliders", "index")), b.number("strength", -10, 10, 1.0)
        vector = self.class_means[to] - self.class_means[frm]  # [*event], as editing.attribute_vector

        def latent():  # as editing.apply_attribute
            start = z()
            return start + s * vector.to(start)
        return self._png(self._decode(latent))

    def api_levels(self, raw) -> bytes:
        """{"index" | "pixels", "keep": k, "temperature": t, "seed": s, "samples": n} -> PNG row of n images that
        keep the top k levels' posterior means and redraw the levels below (model.resample_lower, seeded)."""
        b = Body(raw, {"index", "pixels", "keep", "temperature", "seed", "samples"})
        if self.levels < 2:
            raise RequestError("levels are for hierarchical models (mhvae, ladder); this model has one level")
        x, keep = self._image(b).to(self.device), b.integer("keep", 0, self.levels)
        t, seed = b.number("temperature", 0, 5, 1.0), b.integer("seed", 0, 2**32 - 1, 0)
        n = b.integer("samples", 1, 16, 1)

        def run():
            with seeded(seed, self.device):
                return torch.cat([self.model.resample_lower(x, keep, t) for _ in range(n)])
        return png_bytes(to_unit_range(self.submit(Job(run=run)), self.likelihood).cpu(), nrow=n, scale=1)

    def api_chain(self, raw) -> dict:
        """{"frames": F, "steps": S, "temperature": t, "seed": s} -> {"frames": [F PNG data URLs]}: one denoising
        chain's predicted x from t = 1 to t = 0 (model.denoising_chain, seeded)."""
        b = Body(raw, {"frames", "steps", "temperature", "seed"})
        frames, t = b.integer("frames", 2, 64, 16), b.number("temperature", 0, 5, 1.0)
        seed = b.integer("seed", 0, 2**32 - 1, 0)
        steps = b.integer("steps", 1, 4096) if "steps" in b.raw else None

        def run():
            with seeded(seed, self.device):
                return self.model.denoising_chain(1, steps, frames, t)[0]  # [frames, *data]
        chain = to_unit_range(self.submit(Job(run=run)), self.likelihood).cpu()
        return {"frames": [data_url(png_bytes(f[None], nrow=1, scale=1)) for f in chain]}

    def api_images(self, raw) -> dict:
        """{"start": i, "count": n} -> test images i..i+n-1 as PNG data URLs, with their labels when known."""
        b = Body(raw, {"start", "count"})
        lo = b.integer("start", 0, len(self.x) - 1, 0)
        hi = min(len(self.x), lo + b.integer("count", 1, 64, 16))
        images = to_unit_range(self.x[lo:hi], self.likelihood)
        return {"start": lo, "images": [data_url(png_bytes(i[None], nrow=1, scale=1)) for i in images],
                "labels": None if self.labels is None else self.labels[lo:hi].tolist()}

    # -- pieces ---------------------------------------------------------------------------------------------------

    def _latent(self, b: Body, keys: tuple[str, ...] = ("z", "sliders")) -> Callable[[], Tensor]:
        """z [*event] from "z" (D values), "sliders" (one per unit, or per principal direction: z = mean + sum_i
        s_i sd_i v_i) or "index" (a test image's posterior mean, encoded as editing.encode_means does)."""
        key, size = b.one_of(*keys), self.info["latent_size"]
        if key == "index":
            x = self._image(b)
            return lambda: encode_means(self.model, x.to(self.device))[0]
        if key == "z" or self.info["sliders"]["kind"] == "dims":
            z = b.vector(key, size, -LIMIT, LIMIT, f"this model's latent size is {size}")
        else:
            s = b.vector(key, self.k, -LIMIT, LIMIT, f"one per principal direction, {self.k}")
            sd, directions = self.pca["sd"][: self.k], self.pca["directions"][: self.k]  # [K], [K, D]
            z = torch.from_numpy(self.pca["mean"] + (s.numpy() * sd) @ directions)
        return lambda: z.float().reshape(self.event)

    def _image(self, b: Body) -> Tensor:
        """x [1, *data] in the model's input space: a test image, or a drawing (grey values in [0, 1], one channel;
        binarized at 0.5 for a Bernoulli likelihood, whose test images are {0, 1})."""
        if b.one_of("index", "pixels") == "index":
            i = b.integer("index", 0, len(self.x) - 1)
            return self.x[i:i + 1]
        shape = tuple(self.x.shape[1:])
        if len(shape) != 3 or shape[0] != 1:
            raise RequestError(f"drawn pixels need one-channel images; this run's images are {list(shape)}")
        p = b.vector("pixels", shape[1] * shape[2], 0, 1, f"a {shape[1]}x{shape[2]} grey image, row by row").float()
        x = {"bernoulli": (p >= 0.5).float(), "logistic": 2 * p - 1}.get(self.likelihood, p)
        return x.reshape(1, *shape)

    def _prior_latent(self, temperature: float, seed: int) -> Tensor:
        """z_1 of one draw of model.sample(1, temperature): every latent model here decodes through
        model.decoder, so a pre-hook reads it (the ancestral draw itself stays the model's own)."""
        seen = []
        hook = self.model.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        try:
            with seeded(seed, self.device):
                self.model.sample(1, temperature)
        finally:
            hook.remove()
        return seen[0][0].reshape(self.event)

    def _decode(self, latent: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """(z [*event], E[x | z] [*data] in [0, 1]), decoded in the next batch."""
        return self.submit(Job(latent=latent))

    def _png(self, decoded: tuple[Tensor, Tensor]) -> bytes:
        return png_bytes(decoded[1][None], nrow=1, scale=1)

    def _latent_json(self, z: Tensor, image: Tensor) -> dict:
        flat = z.flatten().double().numpy()
        sliders = flat if self.info["sliders"]["kind"] == "dims" else \
            ((flat - self.pca["mean"]) @ self.pca["directions"][: self.k].T) / self.pca["sd"][: self.k]
        return {"z": flat.tolist(), "sliders": sliders.tolist(), "image": data_url(self._png((z, image)))}


# -- the HTTP server ------------------------------------------------------------------------------------------------

def error_body(message: str) -> bytes:
    return json.dumps({"error": " ".join(str(message).split())}).encode() + b"\n"  # one line


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /api/info, POST /api/<endpoint> with a JSON object; errors as {"error": "..."}."""

    protocol_version = "HTTP/1.1"  # keep-alive: a slider's requests reuse one connection
    server_version = "hvae-explore"
    timeout = 60  # seconds an idle connection keeps its thread
    # Headers and body go out in two writes: with Nagle's algorithm on, the body would wait for the client's delayed
    # ACK of the headers (40 ms on Linux), 100 times the decode itself.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.page)
        elif path == "/api/info":
            self._send(200, "application/json", json.dumps(self.server.explorer.info).encode())
        elif path.startswith("/api/") and hasattr(self.server.explorer, "api_" + path[5:]):
            self._send(405, "application/json", error_body(f"{path} takes POST with a JSON object"), allow="POST")
        else:
            self._send(404, "application/json", error_body(f"no such page {path}; the explorer is at / (API: "
                                                           "/api/info)"))

    def do_POST(self) -> None:
        try:
            path = urlsplit(self.path).path
            if not path.startswith("/api/"):
                raise RequestError(f"no such endpoint {path}; POST to /api/<endpoint>", 404)
            content_type, body = self.server.explorer.handle(path[5:], self._json())
            self._send(200, content_type, body)
        except RequestError as e:
            self._send(e.status, "application/json", error_body(str(e)))
        except (InputError, ValueError) as e:  # a library refusal of the values given (e.g. per-level temperatures)
            self._send(400, "application/json", error_body(str(e)))
        except Exception as e:  # noqa: BLE001 -- answered, and the server keeps serving
            self._send(500, "application/json", error_body(f"{type(e).__name__}: {e}"))

    def do_PUT(self) -> None:
        self.close_connection = True  # its body, if any, is not read
        self._send(405, "application/json", error_body(f"{self.command} is not served; use GET or POST"),
                   allow="GET, POST")

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT

    def _json(self) -> Any:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            raise RequestError("a POST needs a Content-Length header and a JSON object as its body", 411)
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise RequestError(f"request body of {length} bytes is over the limit of {MAX_BODY}", 413)
        try:
            return json.loads(self.rfile.read(int(length)) or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON: {e}") from None

    def _send(self, status: int, content_type: str, body: bytes, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long, an unknown method) in the same
        one-line JSON; an unknown method is a 405 (http.server says 501)."""
        self.close_connection = True
        if code == 501:
            code, message = 405, f"method {self.command} is not served; use GET or POST"
        self._send(code, "application/json", error_body(message or f"HTTP {code}"))

    def log_message(self, format: str, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    """A thread per connection; the Explorer's one decoding thread behind them."""

    daemon_threads = True
    request_queue_size = 128  # many tabs or a benchmark's burst of connections wait instead of being refused

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.explorer = explorer
        self.page = resources.files("hvae").joinpath("explorer", "index.html").read_bytes()
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror or e}); pass another --port "
                              "(0: any free one) or --host") from None

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's, whose getfqdn may wait on a reverse DNS lookup
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}/"


# -- the command line: `hvae explore RUN [--port N] [--host H] [--device D] [--data-dir DIR] [--no-ema]` ---------------

def port_number(text: str) -> int:
    import argparse

    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: any free port); got {value}")
    return value


def add_parser(subparsers, parents: dict):
    """The `explore` subcommand, given the parser's subparsers and the shared parents (arguments.parents())."""
    p = subparsers.add_parser("explore", parents=[parents["run"], parents["ema"]],
                              help="a local web page to walk the run's latent space live")
    p.add_argument("--port", type=port_number, default=8765, help="TCP port (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    return p


def open_run(run: str | Path, device: str = "cpu", data_dir: str | None = None, ema: bool = True) -> Explorer:
    """The Explorer of a run directory: its model (EMA weights when it has them and ema), its test set."""
    from . import checkpoint as ckpt
    from .data import CLASS_NAMES, test_set

    run = Path(run)
    model = ckpt.load(run, device, ema=ema)
    cfg = ckpt.read_config(run)
    x, y = test_set(cfg.data.dataset, data_dir or cfg.data.data_dir, cfg.model.likelihood)
    return Explorer(model, x, y, cfg.model.likelihood, CLASS_NAMES.get(cfg.data.dataset), run.name)


def cmd_explore(args) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM: the CLI's exit code 130 or 143)."""
    explorer = open_run(args.run, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.data_dir,
                        not args.no_ema)
    server = Server(explorer, args.host, args.port)
    explorer.start()
    print(f"hvae explore: {args.run} at {server.url} (Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"hvae explore: note: bound to {args.host}, so other machines may reach this page", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        explorer.close()
    return 0
