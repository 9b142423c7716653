// specrag playground: streams /v1/chat/completions and shows where each piece of the answer
// came from (the message's provenance segments) and which source passages it equals (each
// source's spans). No framework, no build step: served as a file by the Ingress app.
"use strict";

const $ = (id) => document.getElementById(id);
const keyField = $("key");
// the key lives in this page only (session storage of this tab, never sent anywhere but here)
keyField.value = sessionStorage.getItem("specrag-key") || "";
keyField.addEventListener("change", () => sessionStorage.setItem("specrag-key", keyField.value));

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.style.display = message ? "block" : "none";
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

let answerText = "";
let segments = [];        // rendered segments: {start, end, origin, source, node}

function addText(text, provenance) {
  const base = answerText.length;
  answerText += text;
  const segs = (provenance && provenance.length) ? provenance
    : [{answer_start: base, answer_end: base + text.length, origin: "target", source: null}];
  for (const seg of segs) {
    const piece = answerText.slice(seg.answer_start, seg.answer_end);
    const node = el("span", {class: `seg o-${seg.origin}`, "data-origin": seg.origin,
                             "data-start": seg.answer_start, "data-end": seg.answer_end}, piece);
    if (seg.source !== null && seg.source !== undefined) {
      node.dataset.source = seg.source;
      node.title = `copied from source [${seg.source + 1}]`;
    } else {
      node.title = {prompt: "copied from the prompt", answer: "repeats the answer so far",
                    draft_model: "drafted by the draft model", target: "the target model's own token"}[seg.origin] || seg.origin;
    }
    node.addEventListener("mouseenter", () => highlight(node, true));
    node.addEventListener("mouseleave", () => highlight(node, false));
    segments.push({start: seg.answer_start, end: seg.answer_end, node});
    $("answer").appendChild(node);
  }
}

function highlight(node, on) {
  const start = +node.dataset.start, end = +node.dataset.end;
  node.classList.toggle("hl", on);
  let first = null;
  // the source passages this piece of the answer equals (copied or matched spans)
  document.querySelectorAll("mark[data-answer-start]").forEach((mark) => {
    const a = +mark.dataset.answerStart, b = +mark.dataset.answerEnd;
    if (a < end && start < b) {
      mark.classList.toggle("hl", on);
      first = first || mark;
    }
  });
  if (node.dataset.source !== undefined) {
    const card = $(`source-${node.dataset.source}`);
    if (card) { card.classList.toggle("hl", on); first = first || card; }
  }
  if (on && first) first.scrollIntoView({block: "nearest"});
}

function renderSources(sources) {
  const box = $("sources");
  box.textContent = "";
  sources.forEach((src, i) => {
    const card = el("div", {class: "source", id: `source-${i}`});
    card.appendChild(el("h3", {}, `[${i + 1}] ${src.title || src.id}  (${src.source || ""}, score ${Number(src.score).toFixed(3)})`));
    const text = el("div", {class: "text"});
    let at = 0;
    const spans = [...(src.spans || [])].sort((x, y) => x.source_start - y.source_start);
    for (const span of spans) {
      if (span.source_start < at) continue;          // never overlap in the source view
      text.appendChild(document.createTextNode(src.text.slice(at, span.source_start)));
      const mark = el("mark", {class: span.kind, "data-answer-start": span.answer_start,
                               "data-answer-end": span.answer_end,
                               title: `${span.kind} into the answer at ${span.answer_start}-${span.answer_end}`},
                      src.text.slice(span.source_start, span.source_end));
      text.appendChild(mark);
      at = span.source_end;
    }
    text.appendChild(document.createTextNode(src.text.slice(at)));
    card.appendChild(text);
    box.appendChild(card);
  });
}

function renderMetrics(metrics) {
  const body = $("metrics").querySelector("tbody");
  body.textContent = "";
  const spec = metrics.speculation || {}, retr = metrics.retrieval || {}, secs = metrics.seconds || {};
  const rows = [
    ["tokens per target forward", spec.mean_accepted_per_forward],
    ["draft acceptance", spec.acceptance_rate],
    ["tokens drafted / accepted", `${spec.draft_tokens ?? "-"} / ${spec.accepted_tokens ?? "-"}`],
    ["target forwards", spec.target_forwards],
    ["retrievals real / speculated / mismatched", `${retr.real ?? "-"} / ${retr.speculated ?? "-"} / ${retr.mismatched ?? "-"}`],
  ];
  for (const [k, v] of Object.entries(secs)) rows.push([`seconds: ${k}`, v]);
  for (const [name, value] of rows) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, name));
    tr.appendChild(el("td", {}, value === undefined || value === null ? "-" : String(value)));
    body.appendChild(tr);
  }
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function ask() {
  showError("");
  answerText = "";
  segments = [];
  $("answer").textContent = "";
  $("sources").textContent = "";
  $("metrics").querySelector("tbody").textContent = "";
  const button = $("ask");
  button.disabled = true;
  const headers = {"Content-Type": "application/json"};
  if (keyField.value) headers.Authorization = `Bearer ${keyField.value}`;
  const body = {
    messages: [{role: "user", content: $("question").value}],
    stream: true,
    max_tokens: +$("max_tokens").value || 128,
    retrieval: {k: +$("k").value || 4, iterative: $("iterative").checked},
  };
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          handle(JSON.parse(data));
        }
      }
    }
  } catch (e) {
    showError(`request failed: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

function handle(chunk) {
  if (chunk.error) {
    showError(chunk.error.message || "the server reported an error");
    return;
  }
  const choice = (chunk.choices || [])[0];
  if (choice && choice.delta && choice.delta.content) addText(choice.delta.content, choice.delta.provenance);
  if (chunk.sources) renderSources(chunk.sources);
  if (chunk.metrics) renderMetrics(chunk.metrics);
}

$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask();
});
