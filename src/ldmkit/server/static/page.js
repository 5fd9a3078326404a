// The page: fills the sampler list from /v1/model, posts to /v1/images/stream and reads
// its server-sent events (fetch, since EventSource cannot POST), shows every preview,
// then adds the final image with its settings to the gallery. With a picture chosen, the
// same request is an edit (its base64, the strength, a source prompt for a layout edit,
// and the mask painted over it for inpainting). A server started with --api-key answers 401: the page then asks for the key once
// and keeps it in this browser's localStorage for this origin.
"use strict";
const $ = (id) => document.getElementById(id);
const png = (b64) => "data:image/png;base64," + b64;
const KEY = "ldmkit-api-key";

function withKey(headers = {}) {
  const key = localStorage.getItem(KEY);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// Show the key box and wait until a key is entered.
function askForKey(wrong) {
  $("key-box").hidden = false;
  status(wrong ? "the server refused that API key: enter the right one"
               : "this server needs an API key: enter it above", true);
  $("api-key").focus();
  return new Promise((resolve) => {
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      localStorage.setItem(KEY, $("api-key").value.trim());
      $("key-box").hidden = true;
      status("");
      resolve();
    };
  });
}

// fetch with the key; on a 401, ask for the key and try again.
async function api(path, options = {}) {
  for (let asked = false; ; asked = true) {
    const response = await fetch(path, { ...options, headers: withKey(options.headers) });
    if (response.status !== 401) return response;
    await askForKey(asked || localStorage.getItem(KEY) !== null);
  }
}

async function loadModel() {
  const model = await (await api("/v1/model")).json();
  for (const s of model.samplers) {
    const option = new Option(s.title, s.name);
    option.selected = s.name === model.defaults.sampler;
    $("sampler").add(option);
  }
  $("steps").value = model.defaults.steps;
  $("steps").max = model.limits.steps;
  $("guidance").value = model.defaults.guidance;
  $("model-info").textContent = `${model.image_size}×${model.image_size} px · ` +
    `text encoder ${model.text_encoder.name} · T = ${model.schedule.timesteps} · ${model.device}`;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// A chosen file as base64 (the API's `image`), without the data: URL's prefix.
function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Inpainting: the chosen picture under a canvas of its size; dragging paints the mask
// (half-transparent white on screen). `painted` says whether any stroke was drawn.
let painted = false;

function showPicture() {
  const picture = $("picture").files[0];
  $("paint").hidden = !picture;
  if (!picture) return;
  const url = URL.createObjectURL(picture);
  const img = new Image();
  img.onload = () => {
    $("mask").width = img.naturalWidth;
    $("mask").height = img.naturalHeight;
    $("mask").style.backgroundImage = `url(${url})`;
    clearMask();
  };
  img.src = url;
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  painted = false;
}

function paintAt(event) {
  if (!(event.buttons & 1)) return;
  const canvas = $("mask"), box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "rgba(255, 255, 255, 0.7)";
  ctx.beginPath();
  ctx.arc(x, y, Math.max(1, canvas.width / 12), 0, 2 * Math.PI);
  ctx.fill();
  painted = true;
}

// The API's mask: the strokes white on black, the picture's size, as a base64 PNG.
function maskBase64() {
  const strokes = $("mask"), out = document.createElement("canvas");
  out.width = strokes.width;
  out.height = strokes.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  const pixels = strokes.getContext("2d").getImageData(0, 0, out.width, out.height);
  const mask = ctx.getImageData(0, 0, out.width, out.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    if (pixels.data[i + 3] > 0) mask.data.fill(255, i, i + 3);  // painted: white
  }
  ctx.putImageData(mask, 0, 0);
  return out.toDataURL("image/png").split(",")[1];
}

async function request() {
  const body = { prompt: $("prompt").value, steps: Number($("steps").value),
                 guidance: Number($("guidance").value), sampler: $("sampler").value, n: 1 };
  if ($("negative_prompt").value.trim()) body.negative_prompt = $("negative_prompt").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const picture = $("picture").files[0];
  if (picture) {
    body.image = await fileBase64(picture);
    body.strength = Number($("strength").value);
    if ($("source_prompt").value.trim()) body.source_prompt = $("source_prompt").value;
    if (painted) body.mask = maskBase64();
  }
  return body;
}

function describeError(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) return detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ");
  return `${status}: ${detail || "request failed"}`;
}

// Server-sent events from a fetch body: blocks separated by a blank line.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = { name: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event.name = line.slice(7);
        else if (line.startsWith("data: ")) event.data += line.slice(6);
      }
      if (event.data) yield { name: event.name, data: JSON.parse(event.data) };
    }
  }
}

function addToGallery(result) {
  const s = result.settings;
  const card = document.createElement("div");
  card.className = "card";
  const img = new Image();
  img.src = png(result.images[0]);
  img.alt = s.prompt;
  img.className = "result";
  const text = document.createElement("div");
  text.innerHTML = "<b></b><br>";
  text.querySelector("b").textContent = s.prompt || "(unconditional)";
  text.append(`${s.sampler}, ${s.steps} steps, w = ${s.guidance}, ` +
              `rescale ${s.guidance_rescale}, seed ${s.seed}` +
              (s.negative_prompt ? `, not “${s.negative_prompt}”` : "") +
              (s.strength !== null && s.strength !== undefined ?
                `, edit at strength ${s.strength}` : "") +
              (s.source_prompt ? ` of “${s.source_prompt}” (layout edit)` : ""));
  for (const w of result.warnings) text.append(document.createElement("br"), `⚠ ${w}`);
  card.append(img, text);
  $("gallery").prepend(card);
}

async function generate(event) {
  event.preventDefault();
  $("generate").disabled = true;
  status("queued…");
  try {
    const response = await api("/v1/images/stream", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(await request()) });
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      const body = await response.json().catch(() => null);
      status(describeError(response.status, body) + (retry ? ` (retry in ${retry} s)` : ""), true);
      return;
    }
    for await (const { name, data } of events(response)) {
      if (name === "queued") status(data.queued ? `queued behind ${data.queued}…` : "starting…");
      else if (name === "preview") {
        $("live").src = png(data.images[0]);
        status(`denoising: step ${data.step} of ${data.steps} (t = ${data.t})`);
      } else if (name === "done") {
        $("live").src = png(data.images[0]);
        status(`done in ${data.timing.run_s.toFixed(2)} s (batch of ${data.timing.batch_images})`);
        addToGallery(data);
      } else if (name === "error") status(describeError(data.status, data), true);
    }
  } catch (err) {
    status(`connection failed: ${err}`, true);
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("picture").addEventListener("change", showPicture);
$("mask").addEventListener("pointerdown", paintAt);
$("mask").addEventListener("pointermove", paintAt);
$("clear-mask").addEventListener("click", clearMask);
loadModel().catch((err) => status(`cannot read /v1/model: ${err}`, true));
