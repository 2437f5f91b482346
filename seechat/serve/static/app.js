// seechat chat page: one conversation kept in the browser, sent whole to /v1/chat/completions with
// stream: true on every turn (the server's prefix cache makes the old turns free). Images travel
// inline as data: URIs in the user message they were attached to. Boxes written by the model as
// <box>(x1,y1),(x2,y2)</box> (0..1000 of the image's width/height) are drawn over the image.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], pendingImage: null, busy: false };
const BOX_RE = /<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*<\/box>/g;

function parseBoxes(text) {
  const boxes = [];
  for (const m of text.matchAll(BOX_RE)) {
    const [x1, y1, x2, y2] = m.slice(1, 5).map((v) => Math.min(1000, Math.max(0, Number(v))));
    boxes.push({ x1: Math.min(x1, x2), y1: Math.min(y1, y2), x2: Math.max(x1, x2), y2: Math.max(y1, y2) });
  }
  return boxes;
}

function drawBoxes(boxes) {
  const layer = $("box-layer");
  layer.replaceChildren();
  for (const b of boxes) {
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    r.setAttribute("x", b.x1);
    r.setAttribute("y", b.y1);
    r.setAttribute("width", Math.max(1, b.x2 - b.x1));
    r.setAttribute("height", Math.max(1, b.y2 - b.y1));
    r.setAttribute("class", "box");
    layer.appendChild(r);
  }
}

// Reply text with each <box> shown as a tag (text nodes only: model output is never HTML).
function renderReply(el, text) {
  el.replaceChildren();
  let last = 0;
  for (const m of text.matchAll(BOX_RE)) {
    el.appendChild(document.createTextNode(text.slice(last, m.index)));
    const tag = document.createElement("span");
    tag.className = "box-tag";
    tag.textContent = m[0].replace(/<\/?box>/g, "");
    el.appendChild(tag);
    last = m.index + m[0].length;
  }
  el.appendChild(document.createTextNode(text.slice(last)));
  drawBoxes(parseBoxes(text));
}

function addMessage(role, text, imageUrl) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  if (imageUrl) {
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = imageUrl;
    el.appendChild(img);
  }
  if (text) el.appendChild(document.createTextNode(text));
  $("log").appendChild(el);
  $("log").scrollTop = $("log").scrollHeight;
  return el;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("seechat-api-key") || "";
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showImage(url) {
  $("image-preview").src = url;
  $("image-wrap").hidden = false;
  $("drop-hint").hidden = true;
  drawBoxes([]);
}

// Scale the image to fill the panel (small images too), keeping its aspect ratio; the box layer
// covers exactly the image, so 0..1000 box coordinates land where they belong.
function fitImage() {
  const img = $("image-preview");
  if (!img.naturalWidth) return;
  const zone = $("drop-zone");
  const scale = Math.min((zone.clientWidth - 16) / img.naturalWidth, (zone.clientHeight - 16) / img.naturalHeight);
  img.style.width = `${Math.max(1, Math.floor(img.naturalWidth * scale))}px`;
  img.style.height = `${Math.max(1, Math.floor(img.naturalHeight * scale))}px`;
}

async function readImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    addMessage("error", `不是图片 / not an image: ${file ? file.name : "?"}`);
    return;
  }
  let url = await new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
  if (file.size > 4 * 1024 * 1024) url = await shrink(url, 1536);  // keep uploads small
  state.pendingImage = url;
  $("pending").hidden = false;
  showImage(url);
}

async function shrink(url, side) {
  const img = new Image();
  await new Promise((ok, fail) => { img.onload = ok; img.onerror = fail; img.src = url; });
  const scale = Math.min(1, side / Math.max(img.width, img.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(img.width * scale);
  canvas.height = Math.round(img.height * scale);
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.9);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function send(question) {
  const content = [];
  if (state.pendingImage) content.push({ type: "image_url", image_url: { url: state.pendingImage } });
  content.push({ type: "text", text: question });
  const userMsg = { role: "user", content };
  addMessage("user", question, state.pendingImage);
  const image = state.pendingImage;
  state.pendingImage = null;
  $("pending").hidden = true;
  state.busy = true;
  $("send").disabled = true;
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  let reply = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: state.model, messages: [...state.messages, userMsg], stream: true,
                             stream_options: { include_usage: true } }),
    });
    if (resp.status === 401) $("key-box").hidden = false;
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { done = true; break; }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          if (obj.usage) $("status").textContent =
            `${obj.usage.prompt_tokens} prompt tokens (${obj.usage.prompt_tokens_details.cached_tokens} cached), ` +
            `${obj.usage.completion_tokens} generated`;
          const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
          if (delta && delta.content) {
            reply += delta.content;
            renderReply(bubble, reply);
            bubble.dataset.updates = String(Number(bubble.dataset.updates || 0) + 1);
            $("log").scrollTop = $("log").scrollHeight;
          }
        }
      }
    }
    state.messages.push(userMsg, { role: "assistant", content: reply });
    bubble.dataset.done = "true";
  } catch (err) {
    bubble.remove();
    addMessage("error", `出错了 / error: ${err.message}`);
    if (image) { state.pendingImage = image; $("pending").hidden = false; }
  } finally {
    bubble.classList.remove("streaming");
    state.busy = false;
    $("send").disabled = false;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.status === 401) { $("key-box").hidden = false; $("model-name").textContent = "需要 API key"; return; }
    const body = await resp.json();
    state.model = body.data[0].id;
    $("model-name").textContent = state.model;
  } catch (err) {
    $("model-name").textContent = `server unreachable: ${err.message}`;
  }
}

function init() {
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("prompt").value.trim();
    if (!q || state.busy) return;
    $("prompt").value = "";
    send(q);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("file-input").addEventListener("change", (ev) => readImage(ev.target.files[0]));
  $("image-preview").addEventListener("load", fitImage);
  window.addEventListener("resize", fitImage);
  $("drop-zone").addEventListener("click", (ev) => { if (!ev.target.closest("label, input")) $("file-input").click(); });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    readImage(ev.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) { ev.preventDefault(); readImage(item.getAsFile()); }
  });
  $("api-key").addEventListener("change", () => { localStorage.setItem("seechat-api-key", $("api-key").value.trim()); loadModel(); });
  $("clear").addEventListener("click", () => {
    state.messages = [];
    state.pendingImage = null;
    $("log").replaceChildren();
    $("pending").hidden = true;
    $("image-wrap").hidden = true;
    $("drop-hint").hidden = false;
    $("status").textContent = "";
    drawBoxes([]);
  });
  loadModel();
}

window.seechat = { parseBoxes, drawBoxes, renderReply, state };
init();
