"""Photos in, answers out: mtlface_jax.load / FaceModel, the ``mtlface`` command,
the local page's HTTP API, the page in a real headless Chromium, and the
quickstart notebook.

One tiny untrained FAS checkpoint (written as the training loop writes it,
without a train step; see ``tests/test_eval_cli.py``) and one model load are
shared by the module; every call uses the same batch bucket (2 photos or
fewer), so each program compiles once.
"""

import base64
import http.client
import io
import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
import pytest

from mtlface_jax import ages as ages_lib
from mtlface_jax import api
from mtlface_jax import commands as cli
from mtlface_jax import serve
from mtlface_jax import synthetic
from tests.test_eval_cli import tiny_config, write_untrained_checkpoint

REPO = Path(__file__).resolve().parents[1]
RECORDED_THRESHOLD = 0.4242
IMAGE_SIZE = 48  # The tiny config's input side.
NUM_GROUPS = 7
DETECTOR_INSTALLED = any(
    __import__("importlib.util").util.find_spec(m) is not None for m in ("mtcnn", "dlib"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  """The tiny checkpoint, with an evaluation report that records a threshold."""
  workdir = write_untrained_checkpoint(tiny_config(), tmp_path_factory.mktemp("run"))
  (workdir / "eval").mkdir()
  (workdir / "eval" / "report.json").write_text(json.dumps(
      {"verification": {"lfw": {"best_threshold": RECORDED_THRESHOLD, "accuracy_mean": 0.5}}}))
  return workdir


@pytest.fixture(scope="module")
def model(workdir) -> api.FaceModel:
  # The synthetic test faces are aligned crops: no detector, whatever is installed.
  return api.load(workdir, align="none")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
  """Two synthetic people as JPEG/PNG files (112x112 aligned faces)."""
  folder = tmp_path_factory.mktemp("photos")
  data = synthetic.make_dataset(2, 2, seed=0, test_fraction=0.0, num_folds=2,
                                pairs_per_fold=1).train
  a, b = data.images[0], data.images[int(np.flatnonzero(data.ids != data.ids[0])[0])]
  Image.fromarray(a).save(folder / "a.jpg", quality=95)
  Image.fromarray(b).save(folder / "b.png")
  (folder / "notes.txt").write_text("not a photo")
  return {"a": folder / "a.jpg", "b": folder / "b.png", "a_array": a,
          "text": folder / "notes.txt", "folder": folder}


# --------------------------------------------------------------------------- #
# Python API.
# --------------------------------------------------------------------------- #


def test_load_facts_threshold_and_alignment_note(model, workdir):
  notes = []
  auto = api.FaceModel(model.loaded, notice=notes.append)  # align="auto", the default.
  assert model.image_size == IMAGE_SIZE and model.group_labels == ages_lib.group_ranges(7)
  assert model.threshold == pytest.approx(RECORDED_THRESHOLD)
  assert "report.json [lfw]" in model.threshold_source
  if DETECTOR_INSTALLED:
    assert auto.aligns and not notes
  else:
    assert not auto.aligns and notes == [api.NO_DETECTOR_NOTE]  # Said once.
  given = api.FaceModel(model.loaded, align="none", threshold=0.9)
  assert (given.threshold, given.threshold_source, given.aligns) == (0.9, "given", False)
  assert api.find_recorded_threshold(workdir / "checkpoints")[0] == RECORDED_THRESHOLD
  assert api.find_recorded_threshold(workdir / "checkpoints" / "1") == (None, None)


def test_decode_photo_honours_exif_orientation_and_modes(tmp_path):
  image = Image.new("RGB", (60, 40), (200, 10, 10))
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display": stored landscape, shown portrait.
  image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
  assert api.decode_photo(tmp_path / "phone.jpg").shape == (60, 40, 3)
  assert api.decode_photo((tmp_path / "phone.jpg").read_bytes()).shape == (60, 40, 3)
  gray = np.full((10, 12), 7, np.uint8)
  assert api.decode_photo(gray).shape == (10, 12, 3)
  assert api.decode_photo(Image.fromarray(gray).convert("RGBA")).shape == (10, 12, 3)
  with pytest.raises(api.PhotoError, match="uint8"):
    api.decode_photo(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(api.PhotoError, match="missing.jpg: cannot read"):
    api.decode_photo(tmp_path / "missing.jpg")


def test_verify_embed_accept_paths_pil_and_arrays(model, photos):
  same = model.verify(photos["a"], photos["a"])
  assert same.same and same.similarity == pytest.approx(1.0, abs=1e-4)
  assert same.threshold_source == model.threshold_source
  strict = model.verify(photos["a"], photos["b"], threshold=1.01)
  assert not strict.same and strict.threshold_source == "given"
  # The JPEG decoded from disk, its PIL image and its pixels are one face.
  decoded = np.asarray(Image.open(photos["a"]).convert("RGB"))
  embeddings = model.embed([photos["a"], Image.fromarray(decoded)])
  assert embeddings.shape == (2, 512) and embeddings.dtype == np.float32
  np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
  np.testing.assert_allclose(model.embed(decoded)[0], embeddings[0], atol=1e-5)


def test_age_and_progress(model, photos, tmp_path):
  estimates = model.age([photos["a"], photos["a_array"]])
  assert [e.photo for e in estimates] == [str(photos["a"]), "photo 2"]
  for e in estimates:
    assert 0 <= e.age <= 100 and e.label == model.group_labels[e.group]
  faces = model.progress(photos["a"], tmp_path / "grid.png")
  assert faces.shape == (NUM_GROUPS, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert np.all(np.abs(faces) <= 1.0 + 1e-5)
  with Image.open(tmp_path / "grid.png") as grid:  # Input + 7 groups, under a title strip.
    assert grid.size == ((NUM_GROUPS + 1) * IMAGE_SIZE, IMAGE_SIZE + 16)


def test_photo_errors_are_one_line(model, photos):
  with pytest.raises(api.PhotoError, match=r"notes.txt: cannot decode image") as error:
    model.age([photos["text"]])
  assert "\n" not in str(error.value)
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    api.load(photos["folder"] / "nothing")


class FakeDetector:
  """Stands in for mtcnn/dlib: the eye/nose/mouth points of the ArcFace template, N faces."""

  def __init__(self, num_faces: int):
    self.num_faces = num_faces

  def __call__(self, image):
    from mtlface_jax import align  # pylint: disable=g-import-not-at-top
    if not self.num_faces:
      raise align.NoFaceError("no face detected")
    return align.ARCFACE_TEMPLATE * 2.0  # The face of a 224x224 photo.


@pytest.mark.parametrize("num_faces, error", [(1, None), (0, "no face found"),
                                              (3, "3 faces found; crop the photo")])
def test_aligner_with_a_detector(monkeypatch, num_faces, error):
  from mtlface_jax import align  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(align, "make_detector", lambda name: FakeDetector(num_faces))
  aligner = api.make_aligner("auto", notice=pytest.fail)
  photo = np.zeros((224, 224, 3), np.uint8)
  photo[100:106] = 255  # A stripe through the eyes (y = 2 * 51.6).
  if error:
    with pytest.raises(api.PhotoError, match=f"me.jpg: {error}"):
      aligner(photo, "me.jpg")
    return
  face = aligner(photo, "me.jpg")  # The 2x face, warped back onto the 112 template.
  assert face.shape == (112, 112, 3) and face[50:53].min() == 255 and face[60:].max() == 0


def test_detector_on_real_photos(model, photos, shared_dir):
  """With the [align] extra: real LFW photos are aligned; two faces or none are refused."""
  if not DETECTOR_INSTALLED:
    pytest.skip("no face detector installed (pip install -e '.[align]')")
  people = sorted(p for p in (shared_dir / "data" / "lfw" / "images").glob("*") if p.is_dir())
  if len(people) < 2:
    pytest.skip("../shared/data/lfw/images is not present")
  a, b = sorted(people[0].glob("*.jpg"))[0], sorted(people[1].glob("*.jpg"))[0]
  aligned = api.FaceModel(model.loaded, align="auto", notice=pytest.fail)
  assert aligned.aligns and aligned.faces([a]).shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  pair = Image.new("RGB", (300, 150), "white")
  for x, path in ((10, a), (160, b)):
    pair.paste(Image.open(path).crop((60, 60, 190, 190)), (x, 10))
  with pytest.raises(api.PhotoError, match="2 faces found"):
    aligned.faces([np.asarray(pair)])
  with pytest.raises(api.PhotoError, match="no face found"):
    aligned.faces([np.full((160, 160, 3), 128, np.uint8)])


def test_aligner_modes(monkeypatch):
  assert api.make_aligner("none") is None
  with pytest.raises(ValueError, match="align must be one of"):
    api.make_aligner("opencv")
  from mtlface_jax import align  # pylint: disable=g-import-not-at-top

  def missing(name):
    raise ImportError(f"{name}: pip install it")

  monkeypatch.setattr(align, "make_detector", missing)
  seen = []
  assert api.make_aligner("auto", notice=seen.append) is None and seen == [api.NO_DETECTOR_NOTE]
  with pytest.raises(ImportError, match="mtcnn: pip install it"):
    api.make_aligner("mtcnn")  # Asked for by name: say what to install.


# --------------------------------------------------------------------------- #
# The mtlface command (in-process: the compiled programs are shared).
# --------------------------------------------------------------------------- #


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  # The synthetic faces are aligned crops: no detector, whatever is installed.
  extra = ["--no-align"] if argv[0] in cli.RUNNERS else []
  status = cli.main([str(a) for a in argv] + extra)
  out = capsys.readouterr()
  return status, out.out, out.err


def test_cli_verify_age_progress_embed(workdir, photos, tmp_path, capsys, monkeypatch):
  status, out, _ = run_cli(capsys, "verify", photos["a"], photos["a"], "--model", workdir)
  assert status == 0 and out.startswith("same person: similarity 1.0000 (threshold 0.4242")
  status, out, _ = run_cli(capsys, "verify", photos["a"], photos["b"], "--model", workdir,
                           "--threshold", "1.5", "--json")
  verdict = json.loads(out)
  assert status == 0 and verdict["same"] is False and verdict["threshold"] == 1.5
  monkeypatch.setenv(cli.MODEL_ENV, str(workdir))  # --model from the environment.
  status, out, _ = run_cli(capsys, "age", photos["a"], photos["b"], "--json")
  rows = json.loads(out)
  assert status == 0 and [r["photo"] for r in rows] == [str(photos["a"]), str(photos["b"])]
  assert all(r["label"] in ages_lib.group_ranges(7) for r in rows)
  status, out, _ = run_cli(capsys, "age", photos["a"])
  assert status == 0 and out.splitlines()[0].split() == ["photo", "age", "group"]
  status, out, _ = run_cli(capsys, "progress", photos["a"], "-o", tmp_path / "g.png")
  assert status == 0 and "0-10, 11-20" in out and (tmp_path / "g.png").is_file()
  status, out, _ = run_cli(capsys, "embed", photos["a"], photos["b"], "-o", tmp_path / "e.npy")
  assert status == 0 and np.load(tmp_path / "e.npy").shape == (2, 512)


def test_cli_errors_are_one_line_with_nonzero_status(workdir, photos, capsys, monkeypatch):
  monkeypatch.delenv(cli.MODEL_ENV, raising=False)
  cases = [(("age", photos["a"]), "no model: give --model PATH or set MTLFACE_MODEL"),
           (("age", photos["folder"] / "gone.jpg", "--model", workdir), "gone.jpg: cannot read"),
           (("verify", photos["a"], photos["text"], "--model", workdir), "cannot decode image"),
           (("age", photos["a"], "--model", photos["folder"]), "mtlface: error:")]
  for argv, message in cases:
    status, out, err = run_cli(capsys, *argv)
    assert status == 1 and out == "" and message in err, (argv, err)
    assert err.strip().count("\n") == 0 or err.splitlines()[0].startswith("note:"), err


def test_cli_forwards_existing_entry_points(tmp_path, photos, capsys):
  # align: the real command, on a folder of aligned faces with the fixed LFW crop.
  status, out, _ = run_cli(capsys, "align", "--input", photos["folder"], "--output",
                           tmp_path / "aligned", "--lfw-crop", "--skip-bad-examples",
                           "--no-progress")
  assert status == 0 and "aligned into" in out
  assert sorted(p.name for p in (tmp_path / "aligned").iterdir() if p.suffix != ".txt") == [
      "a.jpg", "b.png"]
  assert cli._model_as_checkpoint(["--model", "runs/x", "--protocol=age"]) == [
      "--protocol=age", "--checkpoint=runs/x"]
  assert cli._model_as_checkpoint(["--checkpoint=a", "--model=b"]) == ["--checkpoint=a"]
  # train and eval are absl programs, run as the console script runs them.
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  command = [sys.executable, "-m", "mtlface_jax.commands"]
  done = subprocess.run(command + ["train", "--helpshort"], capture_output=True, text=True,
                        timeout=120, cwd=REPO, env=env)
  assert "--workdir: Run directory" in done.stdout, done.stderr[-2000:]
  done = subprocess.run(command + ["eval", "--model", str(tmp_path / "none"), "--protocol=age",
                                   "--synthetic"], capture_output=True, text=True,
                        timeout=120, cwd=REPO, env=env)
  assert done.returncode == 1 and str(tmp_path / "none") in done.stderr, done.stderr[-2000:]


# --------------------------------------------------------------------------- #
# The page's HTTP API (loopback only, bounded requests).
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def server(model):
  """The page on a free 127.0.0.1 port, with small limits to test them."""
  limits = serve.Limits(max_photo_bytes=200_000, max_pixels=1_000_000)
  httpd = serve.make_server(model, port=0, limits=limits)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()


def request(url: str, body=None, headers=None, timeout: float = 120):
  """(status, parsed JSON or text) of a bounded loopback request."""
  data = json.dumps(body).encode() if isinstance(body, dict) else body
  headers = {"Content-Type": "application/json", **(headers or {})} if data else headers or {}
  req = urllib.request.Request(url, data=data, headers=headers)
  try:
    with urllib.request.urlopen(req, timeout=timeout) as response:
      status, payload, kind = response.status, response.read(), response.headers["Content-Type"]
  except urllib.error.HTTPError as e:
    status, payload, kind = e.code, e.read(), e.headers["Content-Type"]
  return status, json.loads(payload) if "json" in kind else payload.decode()


def b64(path) -> str:
  return base64.b64encode(Path(path).read_bytes()).decode()


def png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_page_and_info(server):
  status, page = request(server + "/")
  assert status == 200 and 'id="files"' in page and "/api/analyze" in page
  status, info = request(server + "/api/info")
  assert status == 200 and info["age_groups"] == ages_lib.group_ranges(7)
  assert info["threshold"] == pytest.approx(RECORDED_THRESHOLD)
  assert request(server + "/nothing")[0] == 404


def test_api_verify_and_age(server, photos):
  status, out = request(server + "/api/analyze", {"photos": [b64(photos["a"]), b64(photos["a"])]})
  assert status == 200 and out["kind"] == "verify" and out["same"] is True
  assert out["similarity"] == pytest.approx(1.0, abs=1e-4)
  data_url = "data:image/png;base64," + b64(photos["b"])
  status, out = request(server + "/api/analyze", {"photos": [data_url]})
  assert status == 200 and out["kind"] == "age" and out["label"] in ages_lib.group_ranges(7)
  strip = base64.b64decode(out["progression"].split(",", 1)[1])
  with Image.open(io.BytesIO(strip)) as image:
    assert image.format == "PNG" and image.size == ((NUM_GROUPS + 1) * IMAGE_SIZE, 64)


def test_api_rejects_bad_uploads(server, photos):
  url = server + "/api/analyze"
  text = base64.b64encode(b"GIF? no, just text").decode()
  assert request(url, {"photos": [text]})[0] == 415
  assert request(url, {"photos": ["%%%"]}) == (400, {"error": "photo 1 is not valid base64"})
  assert request(url, {"photos": []})[0] == 400
  assert request(url, {"photos": [b64(photos["a"])] * 3})[0] == 400
  assert request(url, b"{}", {"Content-Type": "text/plain"})[0] == 415
  # A 2000x2000 PNG is a few kB but 4 MP: refused from its header, never decoded.
  bomb = png_bytes(np.zeros((2000, 2000, 3), np.uint8))
  status, out = request(url, {"photos": [base64.b64encode(bomb).decode()]})
  assert status == 413 and "2000x2000 pixels" in out["error"]
  noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
  status, out = request(url, {"photos": [base64.b64encode(png_bytes(noise)).decode()]})
  assert status == 413 and "limit is 200000" in out["error"]
  # A declared length over the limit is refused before the body is read.
  connection = http.client.HTTPConnection(*url.split("/")[2].split(":"), timeout=60)
  connection.putrequest("POST", "/api/analyze")
  connection.putheader("Content-Type", "application/json")
  connection.putheader("Content-Length", str(10**9))
  connection.endheaders()
  response = connection.getresponse()
  assert response.status == 413 and b"limit is" in response.read()
  connection.close()
  status, out = request(url, {"photos": [b64(photos["a"])]}, {"Host": "evil.example"})
  assert status == 403


# --------------------------------------------------------------------------- #
# The page in a real headless browser (Debian's chromium + chromium-driver).
# --------------------------------------------------------------------------- #

CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions",
                 "--no-first-run", "--window-size=900,760"]


class WebDriver:
  """The few W3C WebDriver commands the test needs, over plain HTTP."""

  def __init__(self, driver_url: str):
    self.base = driver_url
    caps = {"capabilities": {"alwaysMatch": {
        "browserName": "chrome", "goog:chromeOptions": {"args": BROWSER_FLAGS}}}}
    self.session = self._call("POST", "/session", caps)["sessionId"]

  def _call(self, method: str, path: str, body=None, timeout: float = 60):
    data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
    req = urllib.request.Request(self.base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())["value"]
    except urllib.error.HTTPError as e:
      raise AssertionError(f"webdriver {method} {path}: {e.read()[:500]!r}") from None

  def cmd(self, method: str, path: str, body=None):
    return self._call(method, f"/session/{self.session}{path}", body)

  def open(self, url: str) -> None:
    self.cmd("POST", "/url", {"url": url})

  def js(self, script: str):
    return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

  def upload(self, css: str, paths) -> None:
    element = self.cmd("POST", "/element", {"using": "css selector", "value": css})
    element_id = next(iter(element.values()))
    self.cmd("POST", f"/element/{element_id}/value", {"text": "\n".join(map(str, paths))})

  def wait(self, script: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = self.js(script)
      if value:
        return value
      time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {script}")

  def screenshot(self) -> bytes:
    return base64.b64decode(self.cmd("GET", "/screenshot"))

  def quit(self) -> None:
    self._call("DELETE", f"/session/{self.session}")


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
  if CHROMEDRIVER is None:
    pytest.skip("BROWSER TEST SKIPPED: chromedriver not found "
                "(apt-get install chromium chromium-driver)")
  port = free_port()
  driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(100):
      try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
          break
      except OSError:
        time.sleep(0.1)
    web = WebDriver(f"http://127.0.0.1:{port}")
    yield web
    web.quit()
  finally:
    driver.terminate()
    driver.wait(timeout=30)


def test_page_in_a_real_browser(browser, server, photos, tmp_path):
  done = "return document.getElementById('result').dataset.state !== 'busy' && " \
         "document.getElementById('result').dataset.state !== 'idle' && " \
         "document.getElementById('result').dataset.state"
  browser.open(server + "/")
  browser.wait("return document.getElementById('facts').textContent.includes('age groups')")
  browser.upload("#files", [photos["a"], photos["a"]])
  assert browser.wait(done) == "done"
  text = browser.js("return document.getElementById('result').textContent")
  assert "same person" in text and "similarity 1.000" in " ".join(text.split())
  browser.open(server + "/")  # A fresh file input for the one-photo case.
  browser.upload("#files", [photos["b"]])
  assert browser.wait(done) == "done"
  assert "estimated age" in browser.js("return document.getElementById('result').textContent")
  width = browser.wait("const s = document.getElementById('strip'); "
                       "return !s.hidden && s.complete && s.naturalWidth")
  assert width == (NUM_GROUPS + 1) * IMAGE_SIZE
  shot = browser.screenshot()
  (tmp_path / "page.png").write_bytes(shot)
  if os.environ.get("MTLFACE_UPDATE_SCREENSHOT"):  # Refreshes the README's picture.
    (REPO / "docs").mkdir(exist_ok=True)
    Image.open(io.BytesIO(shot)).save(REPO / "docs" / "serve_page.png", optimize=True)
  browser.open(server + "/")
  browser.upload("#files", [photos["text"]])
  assert browser.wait(done) == "error"


# --------------------------------------------------------------------------- #
# The quickstart notebook.
# --------------------------------------------------------------------------- #


def test_quickstart_notebook_runs(workdir, photos, tmp_path, monkeypatch):
  """Executes the notebook's code cells in order, in one namespace, as a kernel would.

  Run in-process (not through nbclient and a Jupyter kernel) so that it shares
  this module's compiled programs and adds no test dependencies.
  """
  notebook = json.loads((REPO / "examples" / "quickstart.ipynb").read_text())
  monkeypatch.setenv("MTLFACE_MODEL", str(workdir))
  monkeypatch.setenv("MTLFACE_PHOTO_A", str(photos["a"]))
  monkeypatch.setenv("MTLFACE_PHOTO_B", str(photos["b"]))
  monkeypatch.setenv("MTLFACE_ALIGN", "none")  # Synthetic faces are aligned crops.
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert len(cells) >= 4
  for index, cell in enumerate(cells):
    source = "".join(cell["source"])
    exec(compile(source, f"quickstart.ipynb cell {index + 1}", "exec"), namespace)  # pylint: disable=exec-used
  assert (tmp_path / "progress.png").is_file()
  assert isinstance(namespace["verdict"], api.Verdict)
