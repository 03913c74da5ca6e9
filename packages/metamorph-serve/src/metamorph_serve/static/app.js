// The chat page: the conversation is kept here and sent whole with each prompt to
// POST /v1/chat/completions (stream: true); text deltas and images are shown as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const messages = $("messages");
const prompt = $("prompt");
const KEY = "metamorph-api-key";

const history = []; // the OpenAI messages of the conversation so far
let attached = []; // data URLs of the images going with the next prompt
let inFlight = null; // the running request's AbortController
let chat = 0; // counts "New chat" clicks: an answer to a cleared chat is dropped

// -- talking to the server ----------------------------------------------------------------
function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  const text = await response.text();
  try {
    message = JSON.parse(text).error.message || message;
  } catch {
    if (text) message += `: ${text.slice(0, 200)}`; // not the API's JSON: show it as it is
  }
  const error = new Error(
    response.status === 401
      ? `This server needs an API key: enter it under Settings › API key. (${message})`
      : message,
  );
  error.status = response.status;
  throw error;
}

async function connect() {
  try {
    const health = await (await request("/health")).json();
    $("model").textContent = `${health.model} · ${health.status}`;
    const entry = (await (await request("/v1/models")).json()).data[0];
    $("model").textContent = `${entry.id} · ready`;
    $("max_tokens").max = entry.metamorph.max_tokens;
    $("image-settings").disabled = !entry.metamorph.image_output;
    for (const old of messages.querySelectorAll(".error.auth")) old.remove();
  } catch (e) {
    if (!e.status) $("model").textContent = "server not answering";
    showError(e);
  }
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value); // undefined: left out, the server's default
}

function requestBody() {
  const decoder = {
    scheduler: $("decoder_scheduler").value.trim() || undefined,
    steps: number("decoder_steps"),
    guidance_scale: number("decoder_guidance_scale"),
    seed: number("decoder_seed"),
  };
  const metamorph = { visual_guidance_scale: number("visual_guidance_scale") };
  if ($("image").checked) metamorph.image = true;
  if (Object.values(decoder).some((v) => v !== undefined)) metamorph.decoder = decoder;
  return {
    messages: history,
    stream: true,
    temperature: number("temperature"),
    top_p: number("top_p"),
    max_tokens: number("max_tokens"),
    seed: number("seed"),
    metamorph,
  };
}

// Reads the server-sent events of a streamed answer; `onPart` gets each content part
// ({type: "text"} or {type: "image_url"}), `onFinish` the finish reason.
async function stream(body, signal, onPart, onFinish) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify(body),
    signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = []; // the data lines of the event being read
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value, { stream: !done });
    const lines = buffer.split(/\r?\n/);
    buffer = done ? "" : lines.pop(); // a line cut between two reads waits for its end
    for (const line of lines) {
      if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      if (line !== "" || !data.length) continue; // a blank line ends an event
      const payload = data.join("\n");
      data = [];
      if (payload === "[DONE]") return;
      const event = JSON.parse(payload);
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices) {
        const content = choice.delta.content;
        if (typeof content === "string" && content) onPart({ type: "text", text: content });
        if (Array.isArray(content)) content.forEach(onPart);
        if (choice.finish_reason) onFinish(choice.finish_reason);
      }
    }
    if (done) throw new Error("the server closed the stream before the answer was complete");
  }
}

// -- the page -----------------------------------------------------------------------------
function scroll() {
  messages.scrollTop = messages.scrollHeight;
}

function showError(error) {
  const el = document.createElement("div");
  el.className = error.status === 401 ? "error auth" : "error";
  el.setAttribute("role", "alert");
  el.textContent = error.message || String(error);
  messages.append(el);
  scroll();
  console.warn(error);
}

function addMessage(role) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  messages.append(el);
  return el;
}

function show(el, part) {
  if (part.type === "text") {
    let last = el.lastElementChild;
    if (!last || !last.classList.contains("text")) {
      last = el.appendChild(document.createElement("span"));
      last.className = "text";
    }
    last.textContent += part.text;
  } else if (part.type === "image_url") {
    const img = el.appendChild(document.createElement("img"));
    img.className = el.classList.contains("user") ? "attached" : "generated";
    img.alt = img.className === "generated" ? "generated image" : "attached image";
    img.src = part.image_url.url;
  }
  scroll();
}

function note(el, text) {
  const small = el.appendChild(document.createElement("small"));
  small.className = "note";
  small.textContent = text;
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attached.forEach((url, k) => {
    const item = box.appendChild(document.createElement("figure"));
    const img = item.appendChild(document.createElement("img"));
    img.src = url;
    img.alt = `attached image ${k + 1}`;
    const remove = item.appendChild(document.createElement("button"));
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove image ${k + 1}`);
    remove.addEventListener("click", () => {
      attached.splice(k, 1);
      renderAttachments();
    });
  });
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send() {
  const text = prompt.value.trim();
  if (inFlight || (!text && !attached.length)) return;
  const thisChat = chat;
  const images = attached.map((url) => ({ type: "image_url", image_url: { url } }));
  const content = text ? [...images, { type: "text", text }] : images;
  const user = addMessage("user");
  content.forEach((part) => show(user, part));
  const answer = addMessage("assistant");
  history.push({ role: "user", content });
  const sent = { text: prompt.value, attached };
  prompt.value = "";
  attached = [];
  renderAttachments();

  const parts = [];
  inFlight = new AbortController();
  busy(true);
  try {
    const onPart = (part) => {
      const last = parts[parts.length - 1];
      if (part.type === "text" && last?.type === "text") last.text += part.text;
      else if (part.type === "text" || part.type === "image_url") parts.push({ ...part });
      show(answer, part);
    };
    const onFinish = (reason) => {
      if (reason !== "stop") note(answer, `(finished: ${reason})`);
    };
    await stream(requestBody(), inFlight.signal, onPart, onFinish);
  } catch (e) {
    if (e.name === "AbortError") note(answer, "(stopped)");
    else showError(e);
  } finally {
    inFlight = null;
    busy(false);
  }
  if (thisChat !== chat) return;
  if (parts.length) {
    const only = parts.length === 1 && parts[0].type === "text";
    history.push({ role: "assistant", content: only ? parts[0].text : parts });
  } else {
    // nothing came back: the prompt goes back to the box, to be sent again
    history.pop();
    user.remove();
    answer.remove();
    prompt.value = sent.text;
    attached = sent.attached;
    renderAttachments();
  }
  prompt.focus();
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => inFlight?.abort());
$("clear").addEventListener("click", () => {
  inFlight?.abort();
  chat += 1;
  history.length = 0;
  messages.replaceChildren();
});
$("attach").addEventListener("change", async (e) => {
  for (const file of e.target.files) {
    if (!file.type.startsWith("image/")) {
      showError(new Error(`'${file.name}' is not an image; attach PNG, JPEG, WebP or GIF files`));
      continue;
    }
    try {
      attached.push(await readDataUrl(file));
    } catch (error) {
      showError(new Error(`'${file.name}' could not be read: ${error.message}`));
    }
  }
  e.target.value = "";
  renderAttachments();
});
$("api-key").value = sessionStorage.getItem(KEY) || "";
$("api-key").addEventListener("change", (e) => {
  const key = e.target.value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
  connect();
});

connect();
