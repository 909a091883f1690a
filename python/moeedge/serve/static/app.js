// moeedge chat: one page, no build step. Streams replies from /v1/chat/completions (server-sent
// events) and shows the server's stats line (/stats) as `moeedge chat` does.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), prompt = $("prompt"), statsLine = $("stats");
let messages = [];
let controller = null;

$("api-key").value = localStorage.getItem("moeedge-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("moeedge-api-key", $("api-key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return { div, who, body };
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function refreshStats() {
  try {
    const r = await fetch("/stats", { headers: headers() });
    if (!r.ok) { statsLine.textContent = "stats: " + await errorText(r); return; }
    const s = await r.json();
    $("model").textContent = s.model + " · " + s.max_context + " tokens of context";
    statsLine.textContent = `[${s.recent_tok_s.toFixed(1)} tok/s, cache hit rate ${(100 * s.cache_hit_rate).toFixed(1)}%, ` +
      `resident ${bytes(s.process_bytes)} of ${bytes(s.budget_bytes)}] ` +
      `active ${s.active_sequences}/${s.max_batch}, queued ${s.queue_length}, ` +
      `generated ${s.generated_tokens} tokens, read ${bytes(s.bytes_read)}`;
  } catch (e) {
    statsLine.textContent = "server unreachable";
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model: "moeedge", stream: true, stream_options: { include_usage: true },
    messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  controller = new AbortController();
  busy(true);
  const start = performance.now();
  let first = null, tokens = 0, content = "", finish = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices[0];
        if (!choice) continue;
        if (choice.delta.content) {
          if (first === null) first = performance.now();
          content += choice.delta.content;
          reply.body.textContent = content;
          log.scrollTop = log.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    messages.push({ role: "assistant", content });
    const seconds = (performance.now() - (first || start)) / 1000;
    reply.who.textContent = `assistant · ${tokens} tokens, first after ${(((first || start) - start) / 1000).toFixed(2)} s, ` +
      `${seconds > 0 ? (tokens / seconds).toFixed(1) : "–"} tok/s (${finish})`;
  } catch (e) {
    if (e.name === "AbortError") {
      messages.push({ role: "assistant", content });
      reply.who.textContent = "assistant · stopped";
    } else {
      messages.pop();
      reply.div.className = "msg error";
      reply.who.textContent = "error";
      reply.body.textContent = e.message;
    }
  } finally {
    controller = null;
    busy(false);
    refreshStats();
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = prompt.value.trim();
  if (!text || controller) return;
  prompt.value = "";
  send(text);
});
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => { messages = []; log.replaceChildren(); });

refreshStats();
setInterval(refreshStats, 1000);
