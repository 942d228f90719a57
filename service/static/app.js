// The click-a-point page. Plain JavaScript, no build step, no network access beyond this server.
//
// Flow: an image chosen or dropped is sent ONCE to POST /v1/features (float16, body discarded) and
// the returned X-Feature-Id is kept per LiFT iteration count; each click then sends only that id to
// POST /v1/similarity (PNG colour map, overlay=false) so the server answers from its feature cache,
// and the map is laid over the image in the browser, where the opacity slider acts instantly.
// With a second image, a click on one image shows the map over the other (cross-image similarity).
// The matches view draws POST /v1/match JSON on a canvas. Every API error shows its message.
//
// Coordinates: clicks are converted to the ORIGINAL image's pixels (x right, y down, origin at the
// top-left corner), the frame the API expects; the browser shows images EXIF-oriented as the server
// does, and the size used is the server's X-Image-Size when it sent one.
//
// Routing: every request names its first image's content digest in X-Lift-Route (see routeKey), so
// a balancer in front of several replicas sends the upload and every later click by id to the
// replica whose cache holds that image's features.
//
// For tests and the curious: <body data-state> is idle|busy, data-latency-ms holds the last
// click -> map-on-screen time measured with performance.now(), data-maps counts maps drawn.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  models: null,
  density: null, // {iterations} or {stride}; null = the server's default
  mode: "similarity",
  images: { a: null, b: null }, // {file, url, width, height, id}: one feature id serves every density
  inflight: false,
  loading: 0, // uploads under way
  pending: null, // the latest point asked for while a request was in flight
  lastClick: null, // {slot, x, y}
  matches: null,
  maps: 0,
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP

const KEY_STORE = "lift-api-key";

function apiKey() {
  // A server started with LIFT_API_KEYS wants `Authorization: Bearer KEY`. The key comes from the
  // address (`/#key=...`, removed from the address bar at once) or from a prompt after a 401, and
  // is kept for this tab only (sessionStorage).
  const match = /(?:^|[#&])key=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem(KEY_STORE) || "";
}

// ---------------------------------------------------------------------------------------------
// Route key: the first 32 hex digits of the SHA-256 of the request's first image, which is also how
// its feature ids begin. WebCrypto computes it where the page is a secure context (https, localhost);
// elsewhere (plain http to another host) browsers withhold crypto.subtle, so a small SHA-256 follows.

const ROUTE_FIELDS = ["feature_id", "feature_id_a", "image", "image_a"];
const digests = new WeakMap(); // File -> route key, computed once per file

function sha256Hex(bytes) {
  const k = new Uint32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const length = bytes.length;
  const padded = new Uint8Array(Math.ceil((length + 9) / 64) * 64);
  padded.set(bytes);
  padded[length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(length / 0x20000000));
  view.setUint32(padded.length - 4, (length << 3) >>> 0);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let offset = 0; offset < padded.length; offset += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(offset + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      [hh, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    [a, b, c, d, e, f, g, hh].forEach((v, i) => { h[i] = (h[i] + v) >>> 0; });
  }
  return Array.from(h, (v) => v.toString(16).padStart(8, "0")).join("");
}

async function fileRouteKey(file) {
  if (!digests.has(file)) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    let hex;
    if (window.crypto && crypto.subtle) {
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
      hex = Array.from(digest, (v) => v.toString(16).padStart(2, "0")).join("");
    } else {
      hex = sha256Hex(bytes);
    }
    digests.set(file, hex.slice(0, 32));
  }
  return digests.get(file);
}

async function routeKey(body) {
  // The first image a request is about: its id's digest, or its file's.
  if (!(body instanceof FormData)) return null;
  for (const field of ROUTE_FIELDS) {
    const value = body.get(field);
    if (typeof value === "string" && /^[0-9a-f]{32}-/.test(value)) return value.slice(0, 32);
    if (value instanceof Blob) return fileRouteKey(value);
  }
  return null;
}

async function api(path, options = {}, askedForKey = false) {
  let response;
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const route = await routeKey(options.body);
  if (route) headers.set("X-Lift-Route", route);
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "connection_error", `cannot reach the server (${err.message})`);
  }
  if (response.ok) return response;
  if (response.status === 401 && !askedForKey) {
    const entered = window.prompt("This server needs an API key (LIFT_API_KEYS). Key:");
    if (entered && entered.trim()) {
      sessionStorage.setItem(KEY_STORE, entered.trim());
      return api(path, options, true);
    }
  }
  let code = `http_${response.status}`;
  let message = response.statusText || "request failed";
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch (_) {
    if (text) message = text.slice(0, 300);
  }
  const error = new ApiError(response.status, code, message);
  error.retryAfter = Number(response.headers.get("Retry-After")) || null;
  throw error;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) q.set(k, String(v));
  return q.toString();
}

// ---------------------------------------------------------------------------------------------
// Messages

function showError(err) {
  const code = err && err.code ? ` (${err.status ? err.status + " " : ""}${err.code})` : "";
  $("error-text").textContent = `${err && err.message ? err.message : String(err)}${code}`;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "busy" : "idle";
}

// ---------------------------------------------------------------------------------------------
// Model information and parameters

function iterationChoices(models) {
  // /v1/models lists the allowed parameters; accept the few shapes a parameter description can take.
  const params = (models && models.parameters) || {};
  const spec = params.iterations;
  let values = null;
  let def = null;
  if (Array.isArray(spec)) values = spec;
  else if (spec && typeof spec === "object") {
    values = spec.allowed || spec.values || spec.choices || spec.enum || null;
    def = spec.default ?? null;
    if (!values && Number.isInteger(spec.min) && Number.isInteger(spec.max)) {
      values = [];
      for (let i = spec.min; i <= spec.max; i++) values.push(i);
    }
  }
  const model = (models && models.model) || {};
  if (!values && model.iterations) values = model.iterations;
  if (!values && model.strides && typeof model.strides === "object") values = Object.keys(model.strides);
  values = (values || []).map(Number).filter(Number.isFinite);
  if (def === null) def = model.default_iterations ?? (values.length ? Math.max(...values) : null);
  return { values, def };
}

function strideFor(models, k) {
  const strides = models && models.model && models.model.strides;
  if (!strides) return null;
  if (Array.isArray(strides)) {
    const hit = strides.find((s) => Number(s.iterations) === k);
    return hit ? hit.stride : null;
  }
  return strides[k] ?? strides[String(k)] ?? null;
}

function densityChoices(models) {
  // [{value, label, params}]: every offered iteration count, plus "stride 1" (pixel-dense, resampled
  // by the server) when the bundle's steps pass one pixel a cell without landing on it (patch 14).
  const { values, def } = iterationChoices(models);
  const choices = values.map((k) => {
    const stride = strideFor(models, k);
    const px = stride ? ` · ${Number(stride).toPrecision(3).replace(/\.?0+$/, "")} px` : "";
    const label = k === 0 ? `0 (backbone only${px})` : `${k} (${2 ** k}× denser${px})`;
    return { value: String(k), label, params: { iterations: k } };
  });
  const strides = values.map((k) => Number(strideFor(models, k))).filter((s) => s > 0);
  if (strides.length && Math.min(...strides) < 1 && Math.max(...strides) > 1 && !strides.includes(1)) {
    choices.push({ value: "s1", label: "pixel-dense (stride 1, resampled)", params: { stride: 1 } });
  }
  return { choices, def: def === null ? null : String(def) };
}

function describeModel(models) {
  const m = models.model || {};
  const backbone = m.backbone || {};
  const name = typeof backbone === "string" ? backbone : backbone.name || backbone.timm_name || "ViT";
  const parts = [name];
  if (m.channels) parts.push(`${m.channels} channels`);
  const sizes = m.input_sizes || m.sizes || (m.input && m.input.sizes);
  if (Array.isArray(sizes) && sizes.length) {
    // [{height, width}] or [[height, width]]; shown as height×width, the bundle's convention.
    const text = sizes.map((s) => (Array.isArray(s) ? s : [s.height, s.width]).join("×"));
    parts.push(`input ${text.join(", ")}`);
  }
  const providers = m.providers || m.active_providers;
  if (Array.isArray(providers) && providers.length) parts.push(`on ${providers.join(", ")}`);
  return parts.join(" · ");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function modelsWhenReady() {
  // A server that is still loading (e.g. the first `lift serve --demo` exports its bundle) answers
  // 503 not_ready with Retry-After: wait and ask again rather than leave a dead page.
  for (;;) {
    try {
      return await (await api("v1/models")).json();
    } catch (err) {
      if (err.status !== 503 || err.code !== "not_ready") throw err;
      $("model-info").textContent = "the model is loading on the server; waiting…";
      await sleep(Math.min(Math.max(err.retryAfter || 2, 1), 10) * 1000);
    }
  }
}

async function loadModels() {
  try {
    const models = await modelsWhenReady();
    state.models = models;
    $("model-info").textContent = describeModel(models);
    if (models.warning) {
      $("demo-warning").textContent = models.warning;
      $("demo-warning").hidden = false;
    }
    const { choices, def } = densityChoices(models);
    state.densities = choices;
    const select = $("iterations");
    select.innerHTML = "";
    for (const choice of choices) {
      const option = document.createElement("option");
      option.value = choice.value;
      option.textContent = choice.label;
      select.appendChild(option);
    }
    select.disabled = choices.length < 2;
    if (def !== null && choices.some((c) => c.value === def)) select.value = def;
    chooseDensity(select.value);
  } catch (err) {
    $("model-info").textContent = "model information unavailable";
    showError(err);
  }
}

function chooseDensity(value) {
  const choice = (state.densities || []).find((c) => c.value === value);
  state.density = choice ? choice.params : null;
  const stride = !choice ? null : choice.params.stride ?? strideFor(state.models, choice.params.iterations);
  $("stride-info").textContent = stride ? `(one descriptor per ${stride} px of model input)` : "";
}

function densityParams() {
  return state.density || {};
}

// ---------------------------------------------------------------------------------------------
// Images

function otherSlot(slot) {
  return slot === "a" ? "b" : "a";
}

function loadLocalImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this file"));
    img.src = url;
  });
}

async function setImage(slot, file) {
  clearError();
  if (!file) {
    dropImage(slot);
    return;
  }
  const url = URL.createObjectURL(file);
  const image = { file, url, width: 0, height: 0, id: null };
  const caption = $(`caption-${slot}`);
  const shown = caption.textContent;
  caption.textContent = `${file.name || "image"}: sending…`;
  state.loading = (state.loading || 0) + 1;
  setBusy(true);
  try {
    // The server is the judge of what is an image: send first, so its error message is the one shown,
    // and the image on screen (if any) stays until the new one is accepted.
    await register(image);
    let src = url;
    try {
      const local = await loadLocalImage(url);
      image.width = image.width || local.naturalWidth;
      image.height = image.height || local.naturalHeight;
    } catch (_) {
      // The server decoded it but this browser cannot show it (e.g. TIFF): maps still work over a
      // grey stand-in of the right shape.
      src = standIn(image.width, image.height);
    }
    dropImage(slot);
    state.images[slot] = image;
    $(`base-${slot}`).src = src;
    $(`stage-${slot}`).classList.remove("empty");
    caption.textContent = `${file.name || "image"} · ${image.width}×${image.height} px`;
    setStatus(state.images[otherSlot(slot)] ? "Click either image: the map shows on the other."
      : "Click or drag on the image.");
  } catch (err) {
    URL.revokeObjectURL(url);
    caption.textContent = shown;
    $(`file-${slot}`).value = ""; // the rejected file is not left selected (choosing it again retries)
    showError(err);
  } finally {
    state.loading -= 1;
    if (!state.loading && !state.inflight) setBusy(false);
    updateLayout();
  }
  if (state.mode === "matches") runMatches();
  if (state.mode === "features") showFeatures();
}

function dropImage(slot) {
  const previous = state.images[slot];
  if (previous) URL.revokeObjectURL(previous.url);
  state.images[slot] = null;
  clearMaps();
  $(`stage-${slot}`).classList.add("empty");
  $(`base-${slot}`).removeAttribute("src");
  $(`caption-${slot}`).textContent = "";
  updateLayout();
}

function standIn(width, height) {
  const canvas = document.createElement("canvas");
  const scale = Math.min(1, 800 / Math.max(width, height));
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#9aa3b2";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/png");
}

async function register(image) {
  // Sends the image once; its feature id then serves every density (the server keeps the image's
  // backbone features and runs only the upsampler for another density).
  const body = new FormData();
  body.append("image", image.file, image.file.name || "image");
  const url = `v1/features?${query({ format: "npy", dtype: "float16", ...densityParams() })}`;
  const response = await api(url, { method: "POST", body });
  await response.arrayBuffer(); // only the headers matter here
  const id = (response.headers.get("X-Feature-Id") || "").split(",")[0].trim();
  if (!id) throw new ApiError(response.status, "no_feature_id", "the server sent no X-Feature-Id header");
  const size = (response.headers.get("X-Image-Size") || "").split("x").map(Number);
  if (size.length === 2 && size.every((v) => v > 0)) [image.width, image.height] = size;
  image.id = id;
  return id;
}

async function featureId(image) {
  return image.id || register(image);
}

async function withFreshIds(call) {
  // The server may have evicted our features (LRU): send the images again, once.
  try {
    return await call();
  } catch (err) {
    if (err.status !== 404 || err.code !== "unknown_feature_id") throw err;
    for (const image of Object.values(state.images)) if (image) image.id = null;
    return call();
  }
}

// ---------------------------------------------------------------------------------------------
// Similarity

function contentBox(slot) {
  // Where the image is drawn inside its <img> box (object-fit: contain may letterbox it).
  const img = $(`base-${slot}`);
  const box = img.getBoundingClientRect();
  const image = state.images[slot];
  const w = image.width || img.naturalWidth || 1;
  const h = image.height || img.naturalHeight || 1;
  const scale = Math.min(box.width / w, box.height / h);
  const dw = w * scale;
  const dh = h * scale;
  return { left: box.left + (box.width - dw) / 2, top: box.top + (box.height - dh) / 2, width: dw, height: dh,
    offsetX: (box.width - dw) / 2, offsetY: (box.height - dh) / 2 };
}

function pointFromEvent(slot, event) {
  const image = state.images[slot];
  const box = contentBox(slot);
  const fx = (event.clientX - box.left) / box.width;
  const fy = (event.clientY - box.top) / box.height;
  if (fx < 0 || fy < 0 || fx > 1 || fy > 1) return null; // on the letterbox, not the image
  // Original pixels, clamped inside the image (a click on the last pixel column maps to < width).
  const x = Math.min(Math.max(fx * image.width, 0), image.width - 1);
  const y = Math.min(Math.max(fy * image.height, 0), image.height - 1);
  return { slot, x: Math.round(x * 100) / 100, y: Math.round(y * 100) / 100 };
}

function placeMarker(slot, x, y, keepOther = false) {
  const image = state.images[slot];
  const box = contentBox(slot);
  const marker = $(`marker-${slot}`);
  marker.style.left = `${box.offsetX + (x / image.width) * box.width}px`;
  marker.style.top = `${box.offsetY + (y / image.height) * box.height}px`;
  marker.hidden = false;
  marker.dataset.x = String(x);
  marker.dataset.y = String(y);
  if (!keepOther) $(`marker-${otherSlot(slot)}`).hidden = true;
}

function keepMarkerOnItsPoint(slot) {
  // The marker is placed in pixels: whenever the image's box changes size (window resize, but also a
  // scrollbar or banner appearing, the panel reflowing), put it back on its point of the image.
  const marker = $(`marker-${slot}`);
  if (marker.hidden || !state.images[slot] || marker.dataset.x === undefined) return;
  placeMarker(slot, Number(marker.dataset.x), Number(marker.dataset.y), true);
}

function showColourRange(header) {
  // The similarities at the ramp's two ends, as the server coloured them (X-Colour-Range: low,high).
  const [low, high] = String(header || "").split(",").map(Number);
  if (!Number.isFinite(low) || !Number.isFinite(high)) return;
  $("legend-low").textContent = `${low.toFixed(3)} (least similar)`;
  $("legend-high").textContent = `${high.toFixed(3)}${high === 1 ? " (the clicked point)" : ""}`;
}

// ---------------------------------------------------------------------------------------------
// The shown map's values: the score under the cursor, the best match on the other image, downloads

async function mapJson(shown) {
  const body = new FormData();
  body.append("feature_id", shown.ids.source);
  if (shown.ids.target !== shown.ids.source) body.append("target_id", shown.ids.target);
  const params = { x: shown.point.x, y: shown.point.y, format: "json", ...densityParams() };
  return (await api(`v1/similarity?${query(params)}`, { method: "POST", body })).json();
}

async function loadMapValues(shown, crossImage) {
  try {
    const data = await mapJson(shown);
    if (state.shown !== shown) return; // another map has been drawn meanwhile
    shown.values = data;
    if (crossImage) placeBestMatch(shown.slot, data);
  } catch (_) {
    // hover values and the best-match marker are extras: the map itself is shown
  }
}

function cellOf(geometry, x, y) {
  // As the server's geometry: original pixels -> model input -> feature cell.
  const u = (x * geometry.content_size.width) / geometry.image_size.width;
  const v = (y * geometry.content_size.height) / geometry.image_size.height;
  return [Math.floor(v / geometry.stride), Math.floor(u / geometry.stride)];
}

function placeBestMatch(slot, data) {
  // The target cell most similar to the clicked point, among the cells on the image.
  const g = data.target;
  const rows = Math.max(1, Math.ceil(g.content_size.height / g.stride - 0.5));
  const cols = Math.max(1, Math.ceil(g.content_size.width / g.stride - 0.5));
  let best = [0, 0];
  for (let r = 0; r < Math.min(rows, data.similarity.length); r++) {
    for (let c = 0; c < Math.min(cols, data.similarity[r].length); c++) {
      if (data.similarity[r][c] > data.similarity[best[0]][best[1]]) best = [r, c];
    }
  }
  const x = ((best[1] + 0.5) * g.stride * g.image_size.width) / g.content_size.width;
  const y = ((best[0] + 0.5) * g.stride * g.image_size.height) / g.content_size.height;
  placeMarker(slot, x, y, true); // the clicked point's marker stays on the other image
  $(`marker-${slot}`).classList.add("best");
  $(`marker-${slot}`).title = `best match: ${data.similarity[best[0]][best[1]].toFixed(3)}`;
  $("stage-" + slot).dataset.bestMatch = `${Math.round(x)},${Math.round(y)}`;
}

function showValueUnderCursor(slot, event) {
  const shown = state.shown;
  if (!shown || shown.kind !== "similarity" || shown.slot !== slot) return;
  if (!shown.values) {
    if (!shown.loading) {
      shown.loading = true;
      loadMapValues(shown, false);
    }
    return;
  }
  const point = pointFromEvent(slot, event);
  if (!point) return;
  const [row, col] = cellOf(shown.values.target, point.x, point.y);
  const line = shown.values.similarity[row];
  if (!line || line[col] === undefined) return;
  $("hover-value").textContent = `similarity ${line[col].toFixed(3)} at (${Math.round(point.x)}, ` +
    `${Math.round(point.y)}), ` +
    `cell row ${row}, col ${col}`;
}

function showMatchUnderPointer(event) {
  // The match whose end is nearest the pointer, within 8 px: its score.
  const rect = $("match-canvas").getBoundingClientRect();
  const x = event.clientX - rect.left;
  const y = event.clientY - rect.top;
  let best = null;
  for (const spot of state.matchSpots || []) {
    for (const [px, py] of spot.ends) {
      const d = Math.hypot(px - x, py - y);
      if (d <= 8 && (!best || d < best.d)) best = { d, score: spot.score };
    }
  }
  $("match-info").dataset.hover = best ? best.score.toFixed(3) : "";
  $("hover-value").textContent = best ? `match score ${best.score.toFixed(3)}` : "";
}

function download(url, name) {
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
}

async function downloadNpy() {
  const shown = state.shown;
  if (!shown || shown.kind !== "similarity") return;
  const body = new FormData();
  body.append("feature_id", shown.ids.source);
  if (shown.ids.target !== shown.ids.source) body.append("target_id", shown.ids.target);
  const params = { x: shown.point.x, y: shown.point.y, format: "npy", ...densityParams() };
  try {
    const blob = await (await api(`v1/similarity?${query(params)}`, { method: "POST", body })).blob();
    const url = URL.createObjectURL(blob);
    download(url, "similarity.npy");
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showError(err);
  }
}

function clearMaps() {
  for (const slot of ["a", "b"]) {
    const heat = $(`heat-${slot}`);
    if (heat.src) URL.revokeObjectURL(heat.src);
    heat.removeAttribute("src");
    heat.alt = "similarity map";
    heat.hidden = true;
    $(`marker-${slot}`).hidden = true;
    $(`marker-${slot}`).classList.remove("best");
    delete $(`stage-${slot}`).dataset.bestMatch;
  }
  state.lastClick = null;
  state.shown = null;
  $("hover-value").textContent = "";
}

function requestPoint(point) {
  if (!point) return;
  state.pending = point;
  if (!state.inflight) drainPoints();
}

async function drainPoints() {
  // One request at a time; while it runs only the latest point is kept (dragging stays smooth).
  state.inflight = true;
  setBusy(true);
  while (state.pending) {
    const point = state.pending;
    state.pending = null;
    try {
      await showSimilarity(point);
    } catch (err) {
      showError(err);
      // The marker moved to the failed point: put it back on the point of the map shown, if any.
      const last = state.lastClick;
      if (last) placeMarker(last.slot, last.x, last.y);
      else for (const slot of ["a", "b"]) $(`marker-${slot}`).hidden = true;
    }
  }
  state.inflight = false;
  if (!state.loading) setBusy(false);
}

async function showSimilarity({ slot, x, y }) {
  const source = state.images[slot];
  if (!source) return;
  const targetSlot = state.images[otherSlot(slot)] ? otherSlot(slot) : slot;
  const target = state.images[targetSlot];
  $(`marker-${slot}`).classList.remove("best");
  $(`marker-${slot}`).title = "";
  placeMarker(slot, x, y);
  const started = performance.now();
  const response = await withFreshIds(async () => {
    const body = new FormData();
    body.append("feature_id", await featureId(source));
    if (target !== source) body.append("target_id", await featureId(target));
    const params = { x, y, format: "png", overlay: false, scale: $("scale").value, ...densityParams() };
    return api(`v1/similarity?${query(params)}`, { method: "POST", body });
  });
  const blob = await response.blob();
  const heat = $(`heat-${targetSlot}`);
  const url = URL.createObjectURL(blob);
  await new Promise((resolve, reject) => {
    heat.onload = resolve;
    heat.onerror = () => reject(new ApiError(response.status, "bad_map", "the server's map is not a PNG"));
    heat.src = url;
  });
  const other = $(`heat-${targetSlot === "a" ? "b" : "a"}`);
  other.hidden = true;
  heat.hidden = false;
  heat.style.opacity = String($("opacity").value / 100);
  showColourRange(response.headers.get("X-Colour-Range"));
  state.shown = { kind: "similarity", slot: targetSlot, png: url, point: { slot, x, y },
                  ids: { source: await featureId(source), target: await featureId(target) } };
  // The map's values (a second, JSON request): at once for the best match on the other image, else
  // only when the pointer first moves over the map.
  if (target !== source) loadMapValues(state.shown, true);
  const elapsed = performance.now() - started;
  state.maps += 1;
  state.lastClick = { slot, x, y };
  document.body.dataset.latencyMs = elapsed.toFixed(1);
  document.body.dataset.maps = String(state.maps);
  clearError();
  const where = targetSlot === slot ? "" : " (shown on the other image)";
  setStatus(`Point (${Math.round(x)}, ${Math.round(y)}): map in ${elapsed.toFixed(0)} ms${where}.`);
}

function bindStage(slot) {
  const stage = $(`stage-${slot}`);
  let dragging = false;
  stage.addEventListener("click", () => {
    if (!state.images[slot]) $(`file-${slot}`).click(); // an empty pane opens the file chooser
  });
  stage.addEventListener("pointerdown", (event) => {
    if (!state.images[slot] || state.mode !== "similarity" || event.button > 0) return;
    dragging = true;
    stage.setPointerCapture(event.pointerId);
    requestPoint(pointFromEvent(slot, event));
    event.preventDefault();
  });
  stage.addEventListener("pointermove", (event) => {
    if (dragging) requestPoint(pointFromEvent(slot, event));
  });
  const stop = () => {
    dragging = false;
  };
  stage.addEventListener("pointerup", stop);
  stage.addEventListener("pointercancel", stop);
  stage.addEventListener("keydown", (event) => {
    // Keyboard: Enter queries the centre, arrows move the last point by 2 % of the image.
    const image = state.images[slot];
    if (!image) {
      if (event.key === "Enter") $(`file-${slot}`).click();
      return;
    }
    if (state.mode !== "similarity") return; // points are queried in the similarity view only
    const last = state.lastClick && state.lastClick.slot === slot ? state.lastClick : null;
    let x = last ? last.x : image.width / 2;
    let y = last ? last.y : image.height / 2;
    const step = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[event.key];
    if (step) {
      x = Math.min(Math.max(x + step[0] * 0.02 * image.width, 0), image.width - 1);
      y = Math.min(Math.max(y + step[1] * 0.02 * image.height, 0), image.height - 1);
    } else if (event.key !== "Enter") return;
    event.preventDefault();
    requestPoint({ slot, x: Math.round(x * 100) / 100, y: Math.round(y * 100) / 100 });
  });
  // Drag and drop onto a pane.
  stage.addEventListener("dragover", (event) => {
    event.preventDefault();
    stage.classList.add("dragover");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
  stage.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation();
    stage.classList.remove("dragover");
    const files = [...event.dataTransfer.files];
    if (files.length >= 2) {
      setImage("a", files[0]).then(() => setImage("b", files[1]));
    } else if (files.length === 1) {
      setImage(slot, files[0]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Matches

async function runMatches() {
  const a = state.images.a;
  const b = state.images.b;
  const info = $("match-info");
  if (!a || !b) {
    state.matches = null;
    drawMatches();
    info.textContent = "Choose two images to see their keypoint matches.";
    return;
  }
  setBusy(true);
  info.textContent = "matching…";
  try {
    const started = performance.now();
    const response = await withFreshIds(async () => {
      const body = new FormData();
      body.append("feature_id_a", await featureId(a));
      body.append("feature_id_b", await featureId(b));
      const params = {
        format: "json",
        max_matches: $("max-matches").value || null,
        min_score: $("min-score").value,
        ...densityParams(),
      };
      return api(`v1/match?${query(params)}`, { method: "POST", body });
    });
    const result = await response.json();
    state.matches = result.matches || [];
    drawMatches();
    const ms = (performance.now() - started).toFixed(0);
    info.textContent = `${state.matches.length} mutual nearest-neighbour matches (${ms} ms); colour = score.`;
    clearError();
  } catch (err) {
    info.textContent = "";
    showError(err);
  } finally {
    setBusy(false);
  }
}

// The server's ramp (service/render.py: heat maps and match drawings), dark blue -> yellow.
const RAMP = [[0, [20, 12, 80]], [0.25, [40, 90, 160]], [0.5, [30, 160, 140]], [0.75, [150, 210, 70]],
              [1, [255, 240, 40]]];

function rampColour(t) {
  const v = Math.min(Math.max(t, 0), 1);
  for (let i = 1; i < RAMP.length; i++) {
    const [p1, c1] = RAMP[i];
    const [p0, c0] = RAMP[i - 1];
    if (v <= p1) {
      const f = (v - p0) / (p1 - p0);
      return `rgb(${c0.map((c, k) => Math.round(c + f * (c1[k] - c))).join(", ")})`;
    }
  }
  return "rgb(255, 240, 40)";
}

function scoreColour(score, lo, hi) {
  // As the server's match PNG: the lowest score shown -> dark blue, the best -> yellow.
  return rampColour(hi > lo ? (score - lo) / (hi - lo) : 1);
}

function drawMatches() {
  const canvas = $("match-canvas");
  const a = state.images.a;
  const b = state.images.b;
  const ctx = canvas.getContext("2d");
  const cssWidth = canvas.parentElement.clientWidth || 800;
  const ratio = window.devicePixelRatio || 1;
  if (!a || !b) {
    canvas.width = cssWidth * ratio;
    canvas.height = 120 * ratio;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.matches = "0";
    return;
  }
  // Both images at the same height, side by side, filling the width.
  const gap = 12;
  const height = Math.min((cssWidth - gap) / (a.width / a.height + b.width / b.height), window.innerHeight * 0.75);
  const wa = (a.width / a.height) * height;
  const wb = (b.width / b.height) * height;
  canvas.width = Math.round((wa + gap + wb) * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${wa + gap + wb}px`;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, wa + gap + wb, height);
  ctx.drawImage($("base-a"), 0, 0, wa, height);
  ctx.drawImage($("base-b"), wa + gap, 0, wb, height);
  const matches = state.matches || [];
  const scores = matches.map((m) => m.score);
  const lo = Math.min(...scores);
  const hi = Math.max(...scores);
  ctx.lineWidth = 1.5;
  // Worst first so the best matches are drawn on top.
  for (const m of [...matches].reverse()) {
    const ax = (m.a[0] / a.width) * wa;
    const ay = (m.a[1] / a.height) * height;
    const bx = wa + gap + (m.b[0] / b.width) * wb;
    const by = (m.b[1] / b.height) * height;
    ctx.strokeStyle = ctx.fillStyle = scoreColour(m.score, lo, hi);
    ctx.beginPath();
    ctx.moveTo(ax, ay);
    ctx.lineTo(bx, by);
    ctx.stroke();
    for (const [px, py] of [[ax, ay], [bx, by]]) {
      ctx.beginPath();
      ctx.arc(px, py, 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  canvas.dataset.matches = String(matches.length);
  // Where each match's ends are on the canvas (CSS pixels), for the score under the pointer.
  state.matchSpots = matches.map((m) => ({
    score: m.score,
    ends: [[(m.a[0] / a.width) * wa, (m.a[1] / a.height) * height],
           [wa + gap + (m.b[0] / b.width) * wb, (m.b[1] / b.height) * height]],
  }));
  $("match-legend-low").textContent = matches.length ? `${lo.toFixed(2)} (lowest shown)` : "";
  $("match-legend-high").textContent = matches.length ? `${hi.toFixed(2)} (best)` : "";
  $("match-legend").hidden = !matches.length;
}

// ---------------------------------------------------------------------------------------------
// Controls

// ---------------------------------------------------------------------------------------------
// Features: the first three principal components of each image's features as RGB (/v1/visualize),
// over the image at the overlay opacity. The second image is coloured in the first one's basis, so
// alike colours mean alike features across the two.

async function showFeatures() {
  clearMaps();
  const first = state.images.a;
  if (!first) return;
  setBusy(true);
  try {
    for (const slot of ["a", "b"]) {
      const image = state.images[slot];
      if (!image) continue;
      const response = await withFreshIds(async () => {
        const body = new FormData();
        body.append("feature_id", await featureId(image));
        if (slot === "b") body.append("basis_id", await featureId(first));
        return api(`v1/visualize?${query({ method: "pca", ...densityParams() })}`, { method: "POST", body });
      });
      const picture = $(`heat-${slot}`);
      const url = URL.createObjectURL(await response.blob());
      await new Promise((resolve, reject) => {
        picture.onload = resolve;
        picture.onerror = () => reject(new ApiError(response.status, "bad_picture", "the server's picture is not a PNG"));
        picture.src = url;
      });
      picture.alt = "features: 3 principal components as RGB";
      picture.hidden = false;
      if (slot === "a") state.shown = { kind: "features", slot, png: url };
    }
    $("status").textContent = "features: principal components 1-3 as red, green, blue";
  } catch (err) {
    showError(err);
  } finally {
    if (!state.loading && !state.inflight) setBusy(false);
  }
}

function setMode(mode) {
  state.mode = mode;
  $("tab-similarity").setAttribute("aria-pressed", String(mode === "similarity"));
  $("tab-features").setAttribute("aria-pressed", String(mode === "features"));
  $("tab-matches").setAttribute("aria-pressed", String(mode === "matches"));
  $("view-similarity").hidden = mode === "matches";
  $("view-matches").hidden = mode !== "matches";
  $("match-controls").hidden = mode !== "matches";
  $("match-hint").hidden = mode !== "matches";
  if (mode !== "matches") $("match-legend").hidden = true;
  $("hint").hidden = mode === "matches";
  $("legend").hidden = mode !== "similarity";
  if (mode === "matches") runMatches();
  if (mode === "features") showFeatures();
  else if (mode === "similarity") clearMaps();
}

function updateLayout() {
  $("clear-b").hidden = !state.images.b;
}

let matchTimer = null;
function rematchSoon() {
  clearTimeout(matchTimer);
  matchTimer = setTimeout(runMatches, 250);
}

function bindControls() {
  $("file-a").addEventListener("change", (e) => setImage("a", e.target.files[0] || null));
  $("file-b").addEventListener("change", (e) => setImage("b", e.target.files[0] || null));
  $("clear-b").addEventListener("click", () => {
    $("file-b").value = "";
    setImage("b", null);
  });
  $("error-close").addEventListener("click", clearError);
  $("tab-similarity").addEventListener("click", () => setMode("similarity"));
  $("tab-matches").addEventListener("click", () => setMode("matches"));
  $("tab-features").addEventListener("click", () => setMode("features"));
  $("opacity").addEventListener("input", (e) => {
    $("opacity-value").textContent = `${e.target.value} %`;
    for (const slot of ["a", "b"]) $(`heat-${slot}`).style.opacity = String(e.target.value / 100);
  });
  $("download-png").addEventListener("click", () => {
    if (state.mode === "matches") download($("match-canvas").toDataURL("image/png"), "matches.png");
    else if (state.shown) download(state.shown.png, state.shown.kind === "features" ? "features.png" : "similarity.png");
  });
  $("match-canvas").addEventListener("pointermove", showMatchUnderPointer);
  $("download-npy").addEventListener("click", downloadNpy);
  for (const slot of ["a", "b"]) {
    $(`stage-${slot}`).addEventListener("pointermove", (event) => showValueUnderCursor(slot, event));
  }
  $("scale").addEventListener("change", () => {
    if (state.mode === "similarity" && state.lastClick) requestPoint(state.lastClick);
  });
  $("iterations").addEventListener("change", (e) => {
    chooseDensity(e.target.value);
    const last = state.lastClick;
    clearMaps();
    if (state.mode === "matches") runMatches();
    else if (state.mode === "features") showFeatures();
    else if (last) requestPoint(last); // same point, new density: the same feature id, no upload
  });
  $("max-matches").addEventListener("input", rematchSoon);
  $("min-score").addEventListener("input", (e) => {
    $("min-score-value").textContent = Number(e.target.value).toFixed(2);
    rematchSoon();
  });
  window.addEventListener("resize", () => {
    if (state.mode === "matches") drawMatches();
  });
  if (window.ResizeObserver) {
    for (const slot of ["a", "b"]) new ResizeObserver(() => keepMarkerOnItsPoint(slot)).observe($(`base-${slot}`));
  } else {
    window.addEventListener("resize", () => ["a", "b"].forEach(keepMarkerOnItsPoint));
  }
  // A file dropped anywhere else on the page goes to the first image (or both, when two).
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const files = [...e.dataTransfer.files];
    if (files.length) setImage("a", files[0]).then(() => files[1] && setImage("b", files[1]));
  });
  bindStage("a");
  bindStage("b");
}

bindControls();
setBusy(false);
loadModels();
