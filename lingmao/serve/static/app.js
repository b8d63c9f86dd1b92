// The page of `python -m lingmao.serve`: options -> POST /api/generate/stream (NDJSON events) -> poems with marks.
"use strict";

const $ = (id) => document.getElementById(id);
const TONE_CLASS = { "平": "t-ping", "仄": "t-ze", either: "t-either", unknown: "t-unknown" };
let controller = null;

async function loadInfo() {
  const res = await fetch("/api/info");
  const info = await res.json();
  const m = info.model;
  $("model-info").textContent = `${m.name || "model"} · ${m.arch || ""} · ${(m.parameters / 1e6).toFixed(2)} M parameters · ` +
    `${m.vocab_size} tokens · ${m.device} · limits: ${info.limits.max_new_tokens} new characters, ${info.limits.time_s} s a request`;
  const select = $("form");
  const shi = document.createElement("optgroup");
  shi.label = "诗 shi";
  for (const f of info.forms) shi.append(new Option(`${f.label} ${f.name}`, f.name));
  const ci = document.createElement("optgroup");
  ci.label = "词 ci tunes";
  for (const t of info.tunes) ci.append(new Option(`${t.name} (${t.characters}字)`, `ci:${t.name}`));
  select.append(shi, ci);
  const fields = m.condition || [];
  document.querySelectorAll(".condition-author").forEach((el) => el.classList.toggle("hidden-option", !fields.includes("author")));
  for (const name of m.authors || []) $("authors").append(new Option(name));
  $("num_samples").max = info.limits.max_samples;
  $("max_new_tokens").max = info.limits.max_new_tokens;
  showOptions();
}

function showOptions() {
  const form = $("form").value;
  const isShi = form !== "" && !form.startsWith("ci:");
  const isCi = form.startsWith("ci:");
  const show = (selector, on) => document.querySelectorAll(selector).forEach((el) => el.classList.toggle("hidden-option", !on));
  show(".verse", form !== "");
  show(".shi", isShi);
  show(".free", form === "");
  $("acrostic").closest("label").classList.toggle("hidden-option", !isShi);
  $("rhyme").querySelector('option[value="modern"]').disabled = isCi;
  if (isCi && $("rhyme").value === "modern") $("rhyme").value = "pingshui";
}

function requestBody() {
  const form = $("form").value;
  const body = {
    prompt: $("prompt").value,
    temperature: Number($("temperature").value),
    num_samples: Number($("num_samples").value) || 1,
  };
  if ($("title").value.trim()) body.title = $("title").value.trim();
  if ($("author").value.trim()) body.author = $("author").value.trim();
  const keywords = $("keywords").value.split(/[\s,，、]+/).filter((k) => k);
  if (keywords.length) {
    body.keywords = keywords;
    body.enforce_keywords = $("enforce_keywords").checked;
  }
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (form === "") {
    body.max_new_tokens = Number($("max_new_tokens").value) || undefined;
  } else if (form.startsWith("ci:")) {
    body.tune = form.slice(3);
    body.rhyme = $("rhyme").value;
  } else {
    body.form = form;
    body.rhyme = $("rhyme").value;
    body.tones = $("tones").value;
    body.pattern = $("pattern").value;
    if ($("acrostic").value.trim()) body.acrostic = $("acrostic").value.trim();
  }
  return body;
}

function showError(message) {
  $("error").textContent = message ? `error: ${message}` : "";
  $("error").hidden = !message;
}

function newCard(index, total, title, prompt) {
  const card = document.createElement("article");
  card.className = "poem";
  card.dataset.tokens = "0";
  const head = document.createElement("h2");
  head.textContent = (title ? `《${title}》` : "") + (total > 1 ? ` ${index + 1}` : "");
  const stream = document.createElement("div");
  stream.className = "stream";
  stream.textContent = prompt;
  const marked = document.createElement("div");
  marked.className = "marked";
  card.append(head, stream, marked);
  $("poems").append(card);
  return card;
}

function renderPoem(card, poem) {
  const marked = card.querySelector(".marked");
  marked.replaceChildren();
  for (const line of poem.lines) {
    const row = document.createElement("div");
    row.className = "line";
    for (const cell of line) {
      const span = document.createElement("span");
      span.className = "cell " + (cell.tone ? TONE_CLASS[cell.tone] : "punct");
      if (cell.rhyme) span.classList.add(cell.rhyme === "ok" ? "r-ok" : "r-miss");
      if (cell.fault) {
        span.classList.add("fault");
        span.title = cell.fault;
      }
      if (cell.repeat) {  // 重韵: a rhyme character used again; 重字: any character used again (叠字 aside)
        span.classList.add(cell.repeat === "重韵" ? "rep-rhyme" : "rep-char");
        span.title = [span.title, cell.repeat].filter(Boolean).join("; ");
      }
      const c = document.createElement("span");
      c.className = "c";
      c.textContent = cell.ch;
      const m = document.createElement("span");
      m.className = "m";
      m.textContent = cell.mark || "\u00a0";
      span.append(c, m);
      row.append(span);
    }
    marked.append(row);
  }
  const v = poem.verdict;
  const verdict = document.createElement("p");
  verdict.className = "verdict";
  const parts = [v.form ? v.form_name : "no form"];
  if (v.pattern) parts.push(v.pattern);
  if (v.rhyme_class.length) parts.push(`韵 ${v.rhyme_class.join(" / ")}`);
  if (v.problems.length) parts.push(v.problems.join("; "));
  verdict.textContent = parts.join(" · ");
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy 复制";
  copy.addEventListener("click", () => copyText(copy, (poem.title ? `${poem.title}\n` : "") + poem.text));
  marked.append(verdict, copy);
  card.dataset.text = poem.text;
  card.classList.add("done");
}

async function copyText(button, text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");  // outside a secure context (http on another host)
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied 已复制";
  setTimeout(() => { button.textContent = "Copy 复制"; }, 1500);
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("poems").replaceChildren();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "writing…";
  controller = new AbortController();
  const body = requestBody();
  let cards = [];
  try {
    const res = await fetch("/api/generate/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
      throw new Error(data.error);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const e = JSON.parse(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        if (e.event === "start") {
          cards = Array.from({ length: e.num_samples }, (_, i) => newCard(i, e.num_samples, body.title, e.prompt));
          $("seed").placeholder = `random (last: ${e.seed})`;
        } else if (e.event === "token") {
          const card = cards[e.sample];
          card.querySelector(".stream").textContent += e.text;
          card.dataset.tokens = String(Number(card.dataset.tokens) + 1);
        } else if (e.event === "done") {
          e.poems.forEach((poem, i) => renderPoem(cards[i], poem));
          $("status").textContent = `seed ${e.seed} · ${e.new_tokens} characters in ${e.seconds} s` +
            (e.stopped ? ` · ${e.stopped}` : "");
        } else if (e.event === "error") {
          throw new Error(e.error);
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") $("status").textContent = "stopped";
    else { showError(err.message); $("status").textContent = ""; }
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("form").addEventListener("change", showOptions);
$("options").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
loadInfo().catch((err) => showError(`cannot load /api/info: ${err.message}`));
