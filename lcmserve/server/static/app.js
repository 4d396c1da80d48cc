// The lcmserve playground: one form, sent to POST /generate/stream; previews while it runs, then the images,
// which also join the gallery of this tab. settings.js, loaded before this file, sets window.LCMSERVE_PLAYGROUND
// from the server's config: the model, the limits, and for a bundled model its prompt guide and examples.
"use strict";
const $ = (id) => document.getElementById(id);
const settings = window.LCMSERVE_PLAYGROUND;
const GALLERY_MAX = 60;  // oldest entries go first: each holds its encoded image in memory
const SEED_MAX = 2 ** 32;

$("model").textContent = settings.model;
$("n").setAttribute("max", settings.max_images);
$("guidance").setAttribute("value", settings.guidance_scale);
// a distilled LCM has no negative branch and would refuse a negative prompt
if (!settings.negative_prompt) $("negative-field").remove();
showGuide();

function showGuide() {
  // what a bundled model understands; any other model shows its id alone
  if (settings.understands) $("understands").textContent = settings.understands;
  else $("understands").remove();
  if (!settings.examples.length) { $("examples-field").remove(); return; }
  $("prompt").value = settings.examples[0];
  $("examples").replaceChildren(...settings.examples.map((text) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.textContent = text;
    button.addEventListener("click", () => { $("prompt").value = text; $("prompt").focus(); });
    item.append(button);
    return item;
  }));
}

function authHeaders() {
  return $("key").value ? {"Authorization": "Bearer " + $("key").value} : {};
}

async function loadCard() {
  // GET /v1/models takes the API key like the generation routes: the card fills once the key is right
  const response = await fetch("/v1/models", {headers: authHeaders()});
  if (!response.ok) {
    $("card-status").textContent = response.status === 401
      ? "Enter the server's API key to see the rest of the card." : await errorText(response);
    return false;
  }
  const card = (await response.json()).data[0];
  $("card-size").textContent = card.native_size + " x " + card.native_size + " px";
  $("card-tokens").textContent = "up to " + card.max_prompt_tokens + " tokens (a longer prompt is cut)";
  $("card-guidance").textContent = String(card.default_guidance_scale);
  $("card-mode").textContent = card.guidance_mode === "cfg"
    ? "cfg (classifier-free guidance; negative prompts work)" : card.guidance_mode + " (distilled; no negative prompt)";
  $("card-backend").textContent = card.backend + ", " + card.dtype + ", " + card.attention + " attention"
    + (card.lora ? " (LoRA " + card.lora + ")" : "");
  $("card-backend").title = card.backend_reason || "";
  $("card-status").textContent = card.backend_reason ? "Why this backend: " + card.backend_reason : "";
  showAdapters(card.adapters || []);
  $("card").dataset.loaded = "true";
  return true;
}

function showAdapters(names) {
  // the adapters a request may choose; a choice that is no longer loaded falls back to none
  const picker = $("adapter"), chosen = picker.value;
  picker.replaceChildren(new Option("none", ""), ...names.map((name) => new Option(name, name)));
  picker.value = names.includes(chosen) ? chosen : "";
  $("adapter-field").hidden = names.length === 0;
}

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

function show(data, body) {
  $("grid").replaceChildren(...data.images.map((image) => figure(
    "data:image/" + data.output_format + ";base64," + image.b64, body.prompt + " (seed " + image.seed + ")",
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

function galleryEntry(src, run) {
  // one image of this tab: click it to run it again, or vary its seed; `run` is what made it
  const item = document.createElement("li");
  item.className = "entry";
  item.dataset.seed = run.seed;
  const again = document.createElement("button");
  again.type = "button";
  again.className = "rerun";
  again.setAttribute("aria-label", "run again: " + run.prompt + ", seed " + run.seed);
  const img = document.createElement("img");
  img.src = src;
  img.alt = run.prompt + " (seed " + run.seed + ")";
  again.append(img);
  again.addEventListener("click", () => runAgain(run));
  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = run.prompt + (run.negative_prompt ? " (not: " + run.negative_prompt + ")" : "");
  const params = document.createElement("p");
  params.className = "params";
  params.textContent = "seed " + run.seed + ", " + run.steps + " steps, w " + run.guidance_scale
    + Object.entries(run.adapters || {}).map(([name, scale]) => ", " + name + " " + scale).join("");
  const vary = document.createElement("button");
  vary.type = "button";
  vary.className = "vary";
  vary.textContent = "vary seed";
  vary.addEventListener("click", () => runAgain({...run, seed: Math.floor(Math.random() * SEED_MAX)}));
  item.append(again, prompt, params, vary);
  return item;
}

function addToGallery(data, body) {
  const entries = data.images.map((image) => galleryEntry(
    "data:image/" + data.output_format + ";base64," + image.b64,
    {prompt: body.prompt, negative_prompt: body.negative_prompt || "", seed: image.seed, steps: data.steps,
     guidance_scale: data.guidance_scale, adapters: body.adapters || null}));
  $("gallery").prepend(...entries);
  while ($("gallery").children.length > GALLERY_MAX) $("gallery").lastElementChild.remove();
}

function runAgain(run) {
  // through the form, so that it shows what runs and the browser checks the values as for a typed request
  $("prompt").value = run.prompt;
  if ($("negative")) $("negative").value = run.negative_prompt;
  $("steps").value = run.steps;
  $("guidance").value = run.guidance_scale;
  $("seed").value = run.seed;
  const [adapter, scale] = Object.entries(run.adapters || {})[0] || ["", 1];
  $("adapter").value = adapter;
  $("adapter-scale").value = scale;
  $("n").value = 1;
  $("form").requestSubmit();
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

async function generate(body) {
  // the stream's previews as they come, then its result
  const headers = {"Content-Type": "application/json", "Accept": "text/event-stream", ...authHeaders()};
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
  return data;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if ($("go").disabled) return;  // one request at a time
  const seed = $("seed").value;
  const body = {prompt: $("prompt").value, steps: Number($("steps").value),
                guidance_scale: Number($("guidance").value), num_images: Number($("n").value),
                seed: seed === "" ? null : Number(seed)};
  if ($("negative") && $("negative").value) body.negative_prompt = $("negative").value;
  if ($("adapter").value) body.adapters = {[$("adapter").value]: Number($("adapter-scale").value)};
  $("go").disabled = true; $("error").textContent = ""; $("status").textContent = "generating...";
  try {
    const data = await generate(body);
    show(data, body);
    addToGallery(data, body);
    $("status").textContent = data.images.length + " image(s) in " + data.timings.total_s.toFixed(2) + " s";
    if (!$("card").dataset.loaded) loadCard();
  } catch (error) {
    $("status").textContent = "";
    $("error").textContent = error.message;
  } finally { $("go").disabled = false; }
});
$("key").addEventListener("change", loadCard);
loadCard();
