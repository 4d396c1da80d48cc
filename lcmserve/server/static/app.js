// The lcmserve playground: one form, sent to POST /generate/stream; previews while it runs, then the images.
// settings.js, loaded before this file, sets window.LCMSERVE_PLAYGROUND from the server's config.
"use strict";
const $ = (id) => document.getElementById(id);
const settings = window.LCMSERVE_PLAYGROUND;

$("model").textContent = settings.model;
$("n").setAttribute("max", settings.max_images);
$("guidance").setAttribute("value", settings.guidance_scale);
// a distilled LCM has no negative branch and would refuse a negative prompt
if (!settings.negative_prompt) $("negative-field").remove();

async function errorText(response) {
  // every lcmserve error is {"error": {type, message, param}}; a proxy in between may send anything
  try {
    const error = (await response.json()).error;
    return response.status + " " + error.type + ": " + error.message;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

function figure(src, alt, text) {
  const element = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  const caption = document.createElement("figcaption");
  caption.textContent = text;
  element.append(img, caption);
  return element;
}

function show(data) {
  $("grid").replaceChildren(...data.images.map((image) => figure(
    "data:image/" + data.output_format + ";base64," + image.b64, $("prompt").value + " (seed " + image.seed + ")",
    "seed " + image.seed + ", " + data.steps + " steps, w " + data.guidance_scale)));
}

function showPreviews(step) {
  // the images' current estimates, low-quality JPEGs, while the request runs
  $("grid").replaceChildren(...step.previews.map((preview) => figure(
    "data:image/jpeg;base64," + preview.b64, "preview of seed " + preview.seed,
    "seed " + preview.seed + ", step " + step.step + " of " + step.total_steps)));
  $("status").textContent = "step " + step.step + " of " + step.total_steps + "...";
  $("grid").dataset.previews = Number($("grid").dataset.previews || 0) + 1;
}

async function* events(response) {
  // server-sent events from a POST (EventSource only GETs): "event: NAME" and "data: JSON" lines, a blank line after
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const fields = {};
      for (const line of buffer.slice(0, end).split("\n")) {
        const at = line.indexOf(": ");
        fields[line.slice(0, at)] = line.slice(at + 2);
      }
      buffer = buffer.slice(end + 2);
      yield [fields.event, JSON.parse(fields.data)];
    }
  }
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const seed = $("seed").value;
  const body = {prompt: $("prompt").value, steps: Number($("steps").value),
                guidance_scale: Number($("guidance").value), num_images: Number($("n").value),
                seed: seed === "" ? null : Number(seed)};
  if ($("negative") && $("negative").value) body.negative_prompt = $("negative").value;
  const headers = {"Content-Type": "application/json", "Accept": "text/event-stream"};
  if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  $("go").disabled = true; $("error").textContent = ""; $("status").textContent = "generating...";
  try {
    const response = await fetch("/generate/stream", {method: "POST", headers, body: JSON.stringify(body)});
    if (!response.ok) throw new Error(await errorText(response));
    $("grid").dataset.previews = 0;
    let data = null;
    for await (const [name, payload] of events(response)) {
      if (name === "step" && payload.previews.length) showPreviews(payload);
      else if (name === "error") throw new Error(payload.error.type + ": " + payload.error.message);
      else if (name === "result") data = payload;
    }
    if (data === null) throw new Error("the stream ended without a result");
    show(data);
    $("status").textContent = data.images.length + " image(s) in " + data.timings.total_s.toFixed(2) + " s";
  } catch (error) {
    $("status").textContent = "";
    $("error").textContent = error.message;
  } finally { $("go").disabled = false; }
});
