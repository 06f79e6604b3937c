"""`hvae explore`: the server's API against the library functions it calls (same latents, same weights, same
pictures), its answers to bad requests, concurrent requests decoded as one batch, the command line, and the page
end to end in headless Chromium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_idx_dir
from PIL import Image
from test_report import chromium, console_errors

import hvae
from hvae import arguments, editing, explore
from hvae import data as hdata
from hvae.errors import CheckpointError, ConfigError
from hvae.visualize import png_bytes, to_unit_range

TINY = {"train": {"epochs": 1, "batch_size": 32}, "runtime": {"threads": 1}}
MODELS = {"vae": {"hidden": [32], "latent_dim": 4},  # 4 units: a slider per unit
          "mhvae": {"name": "mhvae", "hidden": [32], "levels": 2, "latent_dims": [20, 4], "level_hidden": [16]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explore")
    make_idx_dir(root / "fashion-mnist")
    for name, model in MODELS.items():
        hvae.train({**TINY, "model": model}, root / name, data_dir=str(root), progress=False)
    return {name: root / name for name in MODELS}


def start(explorer: explore.Explorer) -> explore.Server:
    server = explore.Server(explorer.start(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def served(runs):
    """name -> (Explorer, its Server on an ephemeral port of 127.0.0.1)."""
    servers = {name: start(explore.open_run(run)) for name, run in runs.items()}
    yield {name: (s.explorer, s) for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()
        s.explorer.close()


def post(server, endpoint: str, body) -> tuple[int, str, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(server, "POST", f"/api/{endpoint}", raw)


def send(server, method: str, path: str, raw: bytes | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"} if raw is not None else {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        conn.close()


def ok(server, endpoint: str, body):
    status, kind, data = post(server, endpoint, body)
    assert status == 200, data
    return json.loads(data) if kind == "application/json" else data


def pixels(png: bytes | str) -> np.ndarray:
    if isinstance(png, str):  # a data: URL
        png = base64.b64decode(png.split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("L"), dtype=np.int16)


def picture(images, likelihood="bernoulli", nrow: int = 1) -> np.ndarray:
    """The library's picture of decoder means [B, *data]: the PNG the server sends for them."""
    return pixels(png_bytes(to_unit_range(images, likelihood), nrow=nrow, scale=1))


def same_picture(got: np.ndarray, want: np.ndarray) -> None:
    # The server decodes a batch of whatever arrived together; a matrix product over another batch size may round
    # its last float bit differently, which can move a pixel by one grey level (of 255), never more.
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def inputs_of(run: Path):
    cfg = hvae.checkpoint.read_config(run)
    data = hdata.load_dataset(cfg.data.dataset, cfg.data.data_dir)
    return hdata.test_input(data.test_x, cfg.model.likelihood), data.test_y


# -- the API against the library ------------------------------------------------------------------------------------

def test_info_gives_sizes_principal_directions_and_class_means(served, runs):
    for name, (explorer, server) in served.items():
        info = json.loads(urllib.request.urlopen(server.url + "api/info", timeout=60).read())
        model = explorer.model
        x, y = inputs_of(runs[name])
        means = editing.encode_means(model, x)
        assert info["latent_size"] == means.shape[1] and info["test_images"] == len(x) == 64
        assert info["levels"] == (2 if name == "mhvae" else 1)
        assert info["sliders"] == ({"kind": "dims", "count": 4, "range": [-3, 3]} if name == "vae" else
                                   {"kind": "pca", "count": 16, "range": [-3, 3]})
        # the principal directions are editing.principal_components': the same projections and variance ratios
        proj, ratio = editing.principal_components(means.numpy(), 3)
        directions = np.array(info["pca"]["directions"])[:3]
        np.testing.assert_allclose((means.double().numpy() - info["pca"]["mean"]) @ directions.T, proj, atol=1e-6)
        np.testing.assert_allclose(info["pca"]["explained_variance"][:3], ratio, atol=1e-9)
        assert sum(info["pca"]["explained_variance"]) == pytest.approx(1)
        # class means: the attribute vector is editing.attribute_vector's
        classes = info["classes"]
        assert classes["labels"] == [0, 1, 2, 3] and classes["names"][:2] == ["T-shirt/top", "Trouser"]
        vector = np.subtract(classes["means"][1], classes["means"][0])
        np.testing.assert_allclose(vector, editing.attribute_vector(model, x, y, 1, 0).numpy(), atol=1e-6)


def test_decode_is_the_decoder_mean_of_z_or_of_the_slider_values(served):
    for name, (explorer, server) in served.items():
        z = torch.linspace(-2, 2, explorer.info["latent_size"])
        same_picture(pixels(ok(server, "decode", {"z": z.tolist()})),
                     picture(editing.decode_means(explorer.model, z[None])))
        # sliders: units themselves (vae), or standard deviations along the principal directions (mhvae)
        k = explorer.info["sliders"]["count"]
        s = np.linspace(-1, 1, k)
        pca = explorer.info["pca"]
        z = torch.tensor(s) if name == "vae" else \
            torch.from_numpy(pca["mean"] + (s * np.array(pca["sd"])) @ np.array(pca["directions"]))
        same_picture(pixels(ok(server, "decode", {"sliders": s.tolist()})),
                     picture(editing.decode_means(explorer.model, z.float()[None])))


def test_encode_gives_the_posterior_mean_and_its_reconstruction(served, runs):
    for name, (explorer, server) in served.items():
        x, _ = inputs_of(runs[name])
        r = ok(server, "encode", {"index": 5})
        z = editing.encode_means(explorer.model, x[5:6])
        np.testing.assert_allclose(r["z"], z[0].numpy(), atol=1e-6)
        same_picture(pixels(r["reconstruction"]), picture(editing.decode_means(explorer.model, z)))
        assert (pixels(r["input"]) == picture(x[5:6])).all()
        assert (pixels(ok(server, "images", {"start": 5, "count": 1})["images"][0]) == picture(x[5:6])).all()
        if name == "mhvae":  # the sliders are the mean's coordinates along the principal directions
            pca = explorer.info["pca"]
            want = (z[0].double().numpy() - pca["mean"]) @ np.array(pca["directions"]).T / pca["sd"]
            np.testing.assert_allclose(r["sliders"], want, atol=1e-6)
        # a drawing: grey values in [0, 1], binarized at 0.5 for this Bernoulli model
        drawing = torch.rand(28 * 28, generator=torch.Generator().manual_seed(1))
        r = ok(server, "encode", {"pixels": drawing.tolist()})
        x_drawn = (drawing >= 0.5).float().reshape(1, 1, 28, 28)
        np.testing.assert_allclose(r["z"], editing.encode_means(explorer.model, x_drawn)[0].numpy(), atol=1e-6)
        assert (pixels(r["input"]) == picture(x_drawn)).all()


def test_random_decodes_the_latent_of_the_models_own_sample(served):
    for explorer, server in served.values():
        r = ok(server, "random", {"temperature": 0.7, "seed": 11})
        with torch.random.fork_rng():
            torch.manual_seed(11)
            sample = explorer.model.sample(1, 0.7)
        same_picture(pixels(r["image"]), picture(sample))
        same_picture(pixels(r["image"]), picture(editing.decode_means(explorer.model, torch.tensor([r["z"]]))))


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolate_is_editing_interpolate_at_the_position(served, runs, method):
    explorer, server = served["vae"]
    x, _ = inputs_of(runs["vae"])
    path = editing.interpolate(explorer.model, x[3:4], x[7:8], steps=5, spherical=method == "spherical")[0]
    for step in (0, 2, 3):
        got = ok(server, "interpolate", {"a": 3, "b": 7, "method": method, "position": step / 4})
        same_picture(pixels(got), picture(path[step:step + 1]))


def test_attribute_is_editing_apply_attribute(served, runs):
    explorer, server = served["vae"]
    x, y = inputs_of(runs["vae"])
    vector = editing.attribute_vector(explorer.model, x, y, 1, 2)
    want = editing.apply_attribute(explorer.model, x[4:5], vector, [1.5])[0]
    same_picture(pixels(ok(server, "attribute", {"index": 4, "to": 1, "from": 2, "strength": 1.5})), picture(want))
    z = editing.encode_means(explorer.model, x[4:5])[0]
    same_picture(pixels(ok(server, "attribute", {"z": z.tolist(), "to": 1, "from": 2, "strength": 1.5})),
                 picture(want))


def test_levels_keep_the_top_levels_as_resample_lower_does(served, runs):
    explorer, server = served["mhvae"]
    x, _ = inputs_of(runs["mhvae"])
    for keep in (0, 1, 2):
        got = ok(server, "levels", {"index": 6, "keep": keep, "temperature": 0.8, "seed": 4, "samples": 3})
        with torch.random.fork_rng():
            torch.manual_seed(4)
            want = torch.cat([explorer.model.resample_lower(x[6:7], keep, 0.8) for _ in range(3)])
        same_picture(pixels(got), picture(want, nrow=3))


def test_a_diffusion_model_serves_its_denoising_chain(runs):
    model = hvae.build_model(hvae.VDMConfig(hidden=[16], embedding=8, timesteps=8), (1, 28, 28)).eval()
    x, _ = inputs_of(runs["vae"])
    server = start(explore.Explorer(model, x[:8], name="vdm"))
    try:
        info = json.loads(urllib.request.urlopen(server.url + "api/info", timeout=60).read())
        assert info["diffusion"] and info["chain"]["steps"] == 8 and "latent_size" not in info
        r = ok(server, "chain", {"frames": 4, "steps": 8, "temperature": 0.9, "seed": 2})
        with torch.random.fork_rng():
            torch.manual_seed(2)
            want = model.denoising_chain(1, 8, 4, 0.9)[0]  # [frames, *data]
        assert len(r["frames"]) == 4
        for frame, image in zip(r["frames"], want):
            same_picture(pixels(frame), picture(image[None]))
        status, _, body = post(server, "decode", {"z": [0.0]})
        assert status == 400 and b"use /api/chain" in body
    finally:
        server.shutdown()
        server.server_close()
        server.explorer.close()


# -- bad requests ---------------------------------------------------------------------------------------------------

Z4 = [0.0] * 4
BAD = [  # (method, path, body, status, part of the message)
    ("GET", "/nope", None, 404, "no such page"),
    ("GET", "/api/decode", None, 405, "takes POST"),
    ("PUT", "/api/decode", b"{}", 405, "not served"),
    ("POST", "/api/nope", b"{}", 404, "unknown endpoint"),
    ("POST", "/elsewhere", b"{}", 404, "no such endpoint"),
    ("POST", "/api/decode", {"z": Z4, "run": "other"}, 404, 'unknown run "other"'),
    ("POST", "/api/decode", b'{"z": [0, 0', 400, "malformed JSON"),
    ("POST", "/api/decode", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/api/decode", {}, 400, "exactly one of z, sliders"),
    ("POST", "/api/decode", {"z": Z4, "sliders": Z4}, 400, "exactly one of"),
    ("POST", "/api/decode", {"z": Z4, "colour": 1}, 400, "unknown key 'colour'"),
    ("POST", "/api/decode", {"z": [0.0] * 3}, 400, "list of 4 numbers"),
    ("POST", "/api/decode", {"z": [0, 0, 0, "a"]}, 400, "out of range"),
    ("POST", "/api/decode", {"z": [0, 0, 0, 1e9]}, 400, "out of range"),
    ("POST", "/api/decode", b'{"z": [0, 0, 0, NaN]}', 400, "out of range"),
    ("POST", "/api/random", {"temperature": -1}, 400, "temperature is out of range"),
    ("POST", "/api/random", {"seed": 1.5}, 400, "seed must be an integer"),
    ("POST", "/api/encode", {"index": 64}, 400, "index is out of range"),
    ("POST", "/api/encode", {"index": True}, 400, "index must be an integer"),
    ("POST", "/api/encode", {"pixels": [0.5] * 783}, 400, "list of 784 numbers"),
    ("POST", "/api/encode", {"pixels": [2] * 784}, 400, "out of range"),
    ("POST", "/api/interpolate", {"a": 0, "b": 1, "position": 1.5}, 400, "position is out of range"),
    ("POST", "/api/interpolate", {"a": 0, "b": 1, "position": 0.5, "method": "cubic"}, 400, "linear, spherical"),
    ("POST", "/api/attribute", {"index": 0, "to": 9, "from": 0}, 400, "class 9 is out of range"),
    ("POST", "/api/levels", {"index": 0, "keep": 0}, 400, "hierarchical models"),
    ("POST", "/api/chain", {}, 400, "for diffusion models"),
    ("POST", "/api/images", {"count": 0}, 400, "count is out of range"),
]


def assert_one_line_error(status: int, kind: str, body: bytes, want_status: int, part: str) -> None:
    assert status == want_status and 400 <= status < 500, (status, body)
    assert kind == "application/json" and body.endswith(b"\n") and body.count(b"\n") == 1
    assert part in json.loads(body)["error"], body


@pytest.mark.parametrize("method, path, body, status, part", BAD, ids=[f"{b[1]}-{b[4]}" for b in BAD])
def test_a_bad_request_gets_a_4xx_and_a_one_line_message_and_serving_goes_on(served, method, path, body, status, part):
    _, server = served["vae"]
    raw = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    assert_one_line_error(*send(server, method, path, raw), status, part)
    assert post(server, "decode", {"z": Z4})[0] == 200


@pytest.mark.parametrize("request_bytes, status, part", [
    (b"POST /api/decode HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    (b"POST /api/decode HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413, "over the limit"),
    (b"GET /a /b HTTP/1.1\r\n\r\n", 400, "Bad request syntax"),
    (b"BREW / HTTP/1.1\r\n\r\n", 405, "method BREW is not served"),
], ids=["no-length", "too-long", "request-line", "method"])
def test_malformed_http_gets_a_4xx_and_a_one_line_message(served, request_bytes, status, part):
    _, server = served["vae"]
    with socket.create_connection(server.server_address[:2], timeout=60) as s:
        s.sendall(request_bytes)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    assert_one_line_error(int(head.split()[1]), "application/json", body, status, part)
    assert post(server, "decode", {"z": Z4})[0] == 200


def test_fifty_concurrent_requests_are_all_answered_in_one_batch(served):
    explorer, server = served["vae"]
    zs = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    answers: dict[int, tuple] = {}

    def ask(i: int) -> None:
        answers[i] = post(server, "decode", {"z": zs[i].tolist()})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    with explorer.lock:  # the decoding thread waits: all 50 requests queue up meanwhile
        before = explorer.submitted
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while explorer.submitted < before + 50 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(50)) and all(a[0] == 200 for a in answers.values())
    assert explorer.largest_batch == 50
    want = editing.decode_means(explorer.model, zs)
    for i, (_, _, png) in answers.items():
        same_picture(pixels(png), picture(want[i:i + 1]))


def test_the_server_never_writes_into_the_run_directory(runs):
    def snapshot(folder: Path) -> dict:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
                if p.is_file()}

    before = snapshot(runs["mhvae"])
    server = start(explore.open_run(runs["mhvae"]))
    try:
        for endpoint, body in (("decode", {"z": [0.0] * 20}), ("encode", {"index": 1}), ("random", {"seed": 1}),
                               ("levels", {"index": 1, "keep": 1}), ("nope", {})):
            post(server, endpoint, body)
    finally:
        server.shutdown()
        server.server_close()
        server.explorer.close()
    assert snapshot(runs["mhvae"]) == before


# -- the command line ------------------------------------------------------------------------------------------------

def explore_parser() -> arguments.Parser:
    parser = arguments.Parser(prog="hvae")
    explore.add_parser(parser.add_subparsers(dest="command", required=True), arguments.parents())
    return parser


def test_the_explore_command_refuses_a_missing_run_a_bad_port_and_a_busy_one(tmp_path, served):
    args = explore_parser().parse_args(["explore", str(tmp_path / "nope")])
    assert (args.port, args.host, args.device, args.no_ema) == (8765, "127.0.0.1", None, False)
    with pytest.raises(CheckpointError, match="does not exist"):
        explore.cmd_explore(args)
    with pytest.raises(arguments.UsageError, match="--port must be in 0..65535"):
        explore_parser().parse_args(["explore", str(tmp_path), "--port", "70000"])
    explorer, busy = served["vae"]
    with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{busy.server_address[1]}"):
        explore.Server(explorer, "127.0.0.1", busy.server_address[1])


def test_hvae_explore_prints_its_address_on_127_0_0_1_and_serves_until_interrupted(runs):
    script = textwrap.dedent("""
        import sys
        from hvae import arguments, explore
        parser = arguments.Parser(prog="hvae")
        explore.add_parser(parser.add_subparsers(dest="command", required=True), arguments.parents())
        try:
            sys.exit(explore.cmd_explore(parser.parse_args(sys.argv[1:])))
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script, "explore", str(runs["vae"]), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "no address printed within 120 s"
        line = proc.stdout.readline()
        assert line.startswith(f"hvae explore: {runs['vae']} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        page = urllib.request.urlopen(url, timeout=60).read().decode()
        assert '<html lang="en">' in page and "api/info" in page
        assert json.loads(urllib.request.urlopen(url + "api/info", timeout=60).read())["run"] == "vae"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


# -- the page in headless Chromium ---------------------------------------------------------------------------------

WAIT = 60  # seconds


def wait_until(browser, script: str, *args):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT, poll_frequency=0.02).until(lambda b: b.execute_script(script, *args))


def version(browser, img: str) -> int:
    return int(browser.execute_script("return Number(document.getElementById(arguments[0]).dataset.version || 0)", img))


SETTLED = ("document.body.dataset.inflight === '0' && "
           "Array.from(document.images).every(i => !i.getAttribute('src') || i.complete)")


def changed(browser, img: str, before: int) -> np.ndarray:
    """Wait until <img id=img> has shown a newer picture, no request is in flight and every picture has loaded;
    its grey pixels."""
    wait_until(browser, "return Number(document.getElementById(arguments[0]).dataset.version || 0) > arguments[1] && "
                        + SETTLED, img, before)
    values = browser.execute_script("""
        const img = document.getElementById(arguments[0]), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)];""", img)
    w, h, rgba = values
    return np.asarray(rgba, dtype=np.int16).reshape(h, w, 4)[..., 0]


def test_the_page_walks_the_latent_space_in_headless_chromium(served, runs, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser = chromium(tmp_path)
    try:
        browser.set_window_size(1400, 1000)
        for name in ("vae", "mhvae"):
            explorer, server = served[name]
            x, _ = inputs_of(runs[name])
            browser.get(server.url)
            wait_until(browser, "return document.body.dataset.ready === '1' && " + SETTLED)
            assert console_errors(browser) == []
            assert browser.find_element(By.ID, "status").text == ""
            page_z = lambda: browser.execute_script("return window.explorer.z")  # noqa: E731

            # picking a test image shows its reconstruction (and the sliders move to its posterior mean)
            before = version(browser, "reconstruction")
            browser.find_element(By.CSS_SELECTOR, 'img.thumb[data-index="3"]').click()
            recon = changed(browser, "reconstruction", before)
            same_picture(recon, picture(editing.decode_means(explorer.model, editing.encode_means(explorer.model,
                                                                                                  x[3:4]))))
            np.testing.assert_allclose(page_z(), editing.encode_means(explorer.model, x[3:4])[0], atol=1e-5)

            # moving a slider changes the decoded image, to the decoder's mean at the page's new z
            before = version(browser, "decoded")
            browser.find_element(By.ID, "slider-0").send_keys(Keys.END)
            moved = changed(browser, "decoded", before)
            assert np.abs(moved - recon).max() > 0
            same_picture(moved, picture(editing.decode_means(explorer.model, torch.tensor([page_z()]))))

            # the interpolation scrubber changes the picture
            before = version(browser, "interp")
            browser.find_element(By.ID, "interp-position").send_keys(Keys.HOME)
            start_picture = changed(browser, "interp", before)
            before = version(browser, "interp")
            browser.find_element(By.ID, "interp-position").send_keys(Keys.END)
            assert np.abs(changed(browser, "interp", before) - start_picture).max() > 0

            if name == "vae":  # a drawing on the canvas is encoded: the sliders move to its posterior mean
                canvas = browser.find_element(By.ID, "canvas")
                before = version(browser, "input")
                ActionChains(browser).move_to_element_with_offset(canvas, -40, -40).click_and_hold() \
                    .move_by_offset(80, 10).move_by_offset(-20, 60).release().perform()
                browser.find_element(By.ID, "encode-drawing").click()
                changed(browser, "input", before)
                drawing = torch.tensor(browser.execute_script("return window.explorer.drawing"))
                assert (drawing >= 0.5).sum() > 20  # the strokes are there
                x_drawn = (drawing >= 0.5).float().reshape(1, 1, 28, 28)
                np.testing.assert_allclose(page_z(), editing.encode_means(explorer.model, x_drawn)[0], atol=1e-5)
            if name == "mhvae":  # the level control changes the picture: keep 1 level, then none
                levels = changed(browser, "levels", 0)
                before = version(browser, "levels")
                Select(browser.find_element(By.ID, "levels-keep")).select_by_value("0")
                assert np.abs(changed(browser, "levels", before) - levels).max() > 0
            assert console_errors(browser) == []
            browser.execute_script("window.scrollTo(0, 0)")
            shot = tmp_path / f"explorer-{name}.png"
            assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
            print(f"screenshot: {shot}")
    finally:
        browser.quit()


def test_the_page_scrubs_a_diffusion_models_denoising_chain(runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser = chromium(tmp_path)
    model = hvae.build_model(hvae.VDMConfig(hidden=[16], embedding=8, timesteps=8), (1, 28, 28)).eval()
    server = start(explore.Explorer(model, inputs_of(runs["vae"])[0][:8], name="vdm"))
    try:
        browser.get(server.url)
        wait_until(browser, "return document.body.dataset.ready === '1' && " + SETTLED)
        assert console_errors(browser) == [] and browser.find_element(By.ID, "status").text == ""
        shown = [browser.find_element(By.ID, p).is_displayed() for p in ("chain-panel", "decode-panel", "data-panel")]
        assert shown == [True, False, False]
        last = changed(browser, "chain", 0)  # the last frame, t = 0
        before = version(browser, "chain")
        browser.find_element(By.ID, "chain-frame").send_keys(Keys.HOME)  # the first, t = 1: noise
        assert np.abs(changed(browser, "chain", before) - last).max() > 0
        assert console_errors(browser) == []
    finally:
        browser.quit()
        server.shutdown()
        server.server_close()
        server.explorer.close()
