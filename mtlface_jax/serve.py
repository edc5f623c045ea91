"""``mtlface serve MODEL``: a local web page for your photos.

Drop two photos: their cosine similarity and a same/different verdict.
Drop one: its estimated age and an age-progression strip titled with the
age ranges.

The server is the standard library's ``http.server`` (threaded, one model
call at a time): the page is one static HTML file and a JSON API of two
routes, so a web framework would add installs without adding anything the
page uses; gradio, the usual model-demo choice, brings a large dependency
tree and a remote-asset front end for what is two file drops. It binds
127.0.0.1 only and answers only requests addressed to it (a Host header of
127.0.0.1 or localhost, against DNS rebinding).

API:
  ``GET /``              the page.
  ``GET /api/info``      the model's facts (:func:`mtlface_jax.api.describe`).
  ``POST /api/analyze``  ``{"photos": [base64 or data: URL, ...]}`` (1 or 2) ->
      ``{"kind": "verify", "similarity", "same", "threshold", ...}`` or
      ``{"kind": "age", "age", "group", "label", "progression": data:image/png URL}``;
      errors are ``{"error": one line}`` with status 400, 413 or 415.

Uploads are checked before decoding: the request and each photo have a size
limit, the format must be an image format in :data:`FORMATS`, and the pixel
count (read from the header) must be under ``max_pixels``, which also stops
decompression bombs. Photos are decoded in memory; the only file written is
the progression PNG, in a temporary directory that is removed at once.
"""

import base64
import binascii
import dataclasses
import http.server
import io
import json
import sys
import threading
from typing import Any

from PIL import Image

from mtlface_jax import api

HOST = "127.0.0.1"
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Upload limits: bytes per photo (decoded), pixels per photo, photos per request."""
  max_photo_bytes: int = 10 * 1024 * 1024
  max_pixels: int = 40_000_000
  max_photos: int = 2

  @property
  def max_request_bytes(self) -> int:
    # base64 is 4/3 of the bytes; a little room for the JSON around it.
    return self.max_photos * (self.max_photo_bytes * 4 // 3 + 4) + 4096


class UploadError(ValueError):
  """A rejected upload, with the HTTP status to answer."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def check_photo(data: bytes, name: str, limits: Limits) -> bytes:
  """Validates one photo's bytes (size, format, pixel count) without decoding pixels.

  Raises:
    UploadError: 413 if too large, 415 if not an accepted image format.
  """
  if len(data) > limits.max_photo_bytes:
    raise UploadError(f"{name} is {len(data)} bytes; the limit is {limits.max_photo_bytes}", 413)
  try:
    with Image.open(io.BytesIO(data)) as image:  # Reads the header only.
      image_format, (width, height) = image.format, image.size
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UploadError(f"{name} is not an image Pillow can read ({e})", 415) from None
  if image_format not in FORMATS:
    raise UploadError(f"{name} is {image_format}; accepted: {', '.join(FORMATS)}", 415)
  if width * height > limits.max_pixels:
    raise UploadError(f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels} "
                      "pixels", 413)
  return data


def parse_photos(body: bytes, limits: Limits) -> list[bytes]:
  """The request body ``{"photos": [...]}`` -> validated photo bytes."""
  try:
    photos = json.loads(body)["photos"]
  except (ValueError, KeyError, TypeError):
    raise UploadError('send JSON {"photos": [base64, ...]}') from None
  if not isinstance(photos, list) or not 1 <= len(photos) <= limits.max_photos:
    raise UploadError(f"send 1 or {limits.max_photos} photos")
  out = []
  for index, text in enumerate(photos):
    name = f"photo {index + 1}"
    if not isinstance(text, str):
      raise UploadError(f"{name} must be a base64 string")
    if text.startswith("data:"):
      text = text.partition(",")[2]
    try:
      data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
      raise UploadError(f"{name} is not valid base64") from None
    out.append(check_photo(data, name, limits))
  return out


def analyze(model: api.FaceModel, photos: list[bytes]) -> dict[str, Any]:
  """Two photos -> verdict; one photo -> age and progression strip."""
  if len(photos) == 2:
    return {"kind": "verify", **model.verify(photos[0], photos[1]).to_dict()}
  estimate = model.age([photos[0]])[0]
  result = {"kind": "age", "age": estimate.age, "group": estimate.group,
            "label": estimate.label}
  if "generator" in model.info.get("modules", ()):
    png = model.progress_png(photos[0])
    result["progression"] = "data:image/png;base64," + base64.b64encode(png).decode()
  return result


class PageHandler(http.server.BaseHTTPRequestHandler):
  """The page and its API; :func:`make_handler` binds a model and limits."""
  server_version = "mtlface"
  model: api.FaceModel
  limits: Limits
  facts: dict
  lock: threading.Lock  # One model call at a time: compiles and caches are shared.

  def log_message(self, *args):  # Quiet: the terminal shows the URL, not each request.
    del args

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.send_header("X-Content-Type-Options", "nosniff")
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, value: Any) -> None:
    self._send(status, json.dumps(value).encode(), "application/json")

  def _local(self) -> bool:
    """Answers 403 unless the request was addressed to this machine by name or IP."""
    host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost"):
      return True
    self._json(403, {"error": "this page answers requests to 127.0.0.1 or localhost only"})
    return False

  def do_GET(self):  # pylint: disable=invalid-name
    if not self._local():
      return
    if self.path in ("/", "/index.html"):
      self._send(200, PAGE.encode(), "text/html; charset=utf-8")
    elif self.path == "/api/info":
      self._json(200, self.facts)
    else:
      self._json(404, {"error": f"no page {self.path}"})

  def do_POST(self):  # pylint: disable=invalid-name
    if not self._local():
      return
    if self.path != "/api/analyze":
      self._json(404, {"error": f"no API {self.path}"})
      return
    try:
      self._json(200, self._analyze())
    except UploadError as e:
      self._json(e.status, {"error": str(e)})
    except (api.PhotoError, ValueError) as e:
      self._json(400, {"error": " ".join(str(e).split())})

  def _analyze(self) -> dict:
    if not (self.headers.get("Content-Type") or "").startswith("application/json"):
      raise UploadError("send application/json", 415)
    try:
      length = int(self.headers.get("Content-Length") or -1)
    except ValueError:
      length = -1
    if length < 0:
      raise UploadError("a Content-Length is required", 411)
    if length > self.limits.max_request_bytes:
      self.close_connection = True  # The body is not read: do not reuse the socket.
      raise UploadError(f"the request is {length} bytes; the limit is "
                        f"{self.limits.max_request_bytes}", 413)
    photos = parse_photos(self.rfile.read(length), self.limits)
    with self.lock:
      return analyze(self.model, photos)


def make_handler(model: api.FaceModel, limits: Limits) -> type:
  """A :class:`PageHandler` class bound to ``model`` and ``limits``."""
  return type("BoundPageHandler", (PageHandler,),
              {"model": model, "limits": limits, "facts": api.describe(model),
               "lock": threading.Lock()})


def make_server(model: api.FaceModel, port: int = 8000,
                limits: Limits = Limits()) -> http.server.ThreadingHTTPServer:
  """A server on 127.0.0.1:``port`` (0: any free port; see ``server_address``)."""
  server = http.server.ThreadingHTTPServer((HOST, port), make_handler(model, limits))
  server.daemon_threads = True
  return server


def serve(model: api.FaceModel, port: int = 8000) -> int:
  """Serves until Ctrl-C; returns the exit status."""
  server = make_server(model, port)
  print(f"mtlface: open http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)",
        file=sys.stderr, flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>MTLFace</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem;
        color: #222; }
 h1 { font-size: 1.4rem; margin-bottom: .2rem; }
 #facts { color: #666; font-size: .85rem; margin-bottom: 1rem; overflow-wrap: anywhere; }
 #drop { display: block; border: 2px dashed #888; border-radius: 12px; padding: 2rem; text-align: center;
         background: #fafafa; cursor: pointer; }
 #drop.over { background: #eef5ff; border-color: #36c; }
 #thumbs img { height: 96px; margin: .5rem .25rem 0; border-radius: 6px; }
 #result { margin-top: 1.2rem; font-size: 1.15rem; min-height: 1.5rem; }
 #result .same { color: #1a7f37; font-weight: 600; }
 #result .different { color: #b42318; font-weight: 600; }
 #result .error { color: #b42318; }
 #strip { display: block; margin-top: .8rem; height: 9rem; max-width: 100%; object-fit: contain;
          object-position: left; }
</style></head>
<body>
<h1>MTLFace on your photos</h1>
<div id="facts">loading the model&hellip;</div>
<label id="drop" for="files">
  Drop <b>two photos</b> to compare faces, or <b>one</b> for its age and age progression.
  <br><small>or click to choose &middot; nothing leaves this computer</small>
  <input id="files" type="file" accept="image/*" multiple hidden>
</label>
<div id="thumbs"></div>
<div id="result" data-state="idle"></div>
<img id="strip" alt="" hidden>
<script>
const $ = (id) => document.getElementById(id);
fetch('/api/info').then(r => r.json()).then(info => {
  $('facts').textContent = `${info.family || ''} model, ${info.image_size}px input, ` +
    `age groups ${info.age_groups.join(', ')}; threshold ${info.threshold.toFixed(3)} ` +
    `(${info.threshold_source}); ${info.aligns ? 'faces aligned by a detector'
                                                : 'photos taken as aligned face crops'}`;
});
const readAsDataURL = (file) => new Promise((ok, fail) => {
  const reader = new FileReader();
  reader.onload = () => ok(reader.result); reader.onerror = () => fail(reader.error);
  reader.readAsDataURL(file);
});
function show(state, html) { const r = $('result'); r.dataset.state = state; r.innerHTML = html; }
function escapeHtml(text) {
  const d = document.createElement('div'); d.textContent = text; return d.innerHTML;
}
async function analyze(files) {
  files = Array.from(files).slice(0, 2);
  $('strip').hidden = true; $('thumbs').innerHTML = '';
  if (!files.length) return;
  const photos = await Promise.all(files.map(readAsDataURL));
  for (const url of photos) { const img = new Image(); img.src = url; $('thumbs').append(img); }
  show('busy', 'thinking&hellip;');
  try {
    const response = await fetch('/api/analyze', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify({photos})});
    const out = await response.json();
    if (!response.ok) throw new Error(out.error || response.statusText);
    if (out.kind === 'verify') {
      const verdict = out.same ? '<span class="same">same person</span>'
                               : '<span class="different">different people</span>';
      show('done', `${verdict} &middot; similarity <b id="similarity">${out.similarity.toFixed(3)}
        </b> (threshold ${out.threshold.toFixed(3)})`);
    } else {
      show('done', `estimated age <b id="age">${out.age.toFixed(1)}</b> (group ${out.label})`);
      if (out.progression) { $('strip').src = out.progression; $('strip').hidden = false; }
    }
  } catch (e) { show('error', `<span class="error">${escapeHtml(e.message)}</span>`); }
}
$('files').addEventListener('change', (e) => analyze(e.target.files));
const drop = $('drop');
['dragenter', 'dragover'].forEach(t => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add('over'); }));
['dragleave', 'drop'].forEach(t => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove('over'); }));
drop.addEventListener('drop', (e) => analyze(e.dataTransfer.files));
</script>
</body></html>
"""
