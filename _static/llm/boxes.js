// boxes.js: the boxes of the website that run the course's models in the page.
//
// A chapter asks for a box with <div class="llm-box" data-box="...">:
//   tokenizer  data-tokenizers="a.json|label;b.json|label": text -> tokens, side by side
//   generate   data-model="x.safetensors" data-prompt="...": a GPT continues the prompt
//   chat       data-models="x.safetensors|label;...": a chat model, one stage at a time
// The files are in _static/models/, written by the chapters (lessons_lib.web). Everything
// runs here, in the browser: gpt.js is the forward pass, tokenizers.js the tokenizers.
// Each box says what it is doing in data-state (loading, ready, running, done, error) and
// keeps the ids it shows in data-ids, so that a test can read them.
"use strict";

(function () {
  const MODELS = new URL("../models/", document.currentScript.src);
  const COLOURS = ["#fde2e4", "#dfe7fd", "#e2ece9", "#fff1c1", "#e8dff5", "#d7f2d0"];
  const loaded = new Map();                      // file -> Promise of what it holds

  function el(tag, props = {}, children = []) {
    const node = Object.assign(document.createElement(tag), props);
    for (const child of children) node.append(child);
    return node;
  }

  function pairs(spec) {                         // "a|label;b|label" -> [[a, label], ...]
    return spec.split(";").map((s) => s.split("|").map((t) => t.trim()));
  }

  async function fetchFile(name, as) {
    if (location.protocol === "file:") {
      throw new Error("a page opened from a file may not read other files. Serve the site: " +
                      "python -m http.server -d _build/html, then open " +
                      "http://localhost:8000");
    }
    const response = await fetch(new URL(name, MODELS));
    if (!response.ok) {
      throw new Error(`${name}: ${response.status} ${response.statusText}. The chapter's ` +
                      "notebook writes it; run it, then build the site again.");
    }
    return as === "json" ? response.json() : response.arrayBuffer();
  }

  function loadTokenizer(name) {
    if (!loaded.has(name)) {
      loaded.set(name, fetchFile(name, "json").then(llmTokenizers.tokenizerFromDict));
    }
    return loaded.get(name);
  }

  function loadModel(name) {
    if (!loaded.has(name)) {
      loaded.set(name, fetchFile(name, "buffer").then((buffer) => {
        const model = llmGPT.GPT.fromSafetensors(buffer);
        const metadata = model.metadata;
        const tokenizer = llmTokenizers.tokenizerFromDict(JSON.parse(metadata.tokenizer));
        const template = JSON.parse(metadata.template);
        return {model, tokenizer, template, megabytes: buffer.byteLength / 1e6};
      }));
    }
    return loaded.get(name);
  }

  function setState(box, state, message = "") {
    box.dataset.state = state;
    const status = box.querySelector(".llm-status");
    box.append(status);                           // below whatever the box shows
    status.textContent = message;
    status.classList.toggle("llm-error", state === "error");
  }

  function describe(model) {
    const c = model.config;
    const params = model.numParameters.toLocaleString("en-US");
    return `${c.n_layer} layers x ${c.n_embd}, ${params} parameters, ` +
           `a window of ${c.block_size} tokens`;
  }

  // -- one token as a coloured box (hover: its id) ------------------------------------
  // the token's bytes as text; a byte that is not part of a whole UTF-8 character is
  // written as an escape such as \xf0 (Python's errors="backslashreplace")
  const strict = new TextDecoder("utf-8", {fatal: true});

  function tokenText(bytes) {
    let text = "";
    let i = 0;
    while (i < bytes.length) {
      const b = bytes[i];
      const n = b < 0x80 ? 1 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 0;
      try {
        if (n === 0 || i + n > bytes.length) throw new Error("not a whole character");
        text += strict.decode(bytes.subarray(i, i + n));
        i += n;
      } catch (err) {
        text += "\\x" + b.toString(16).padStart(2, "0");
        i += 1;
      }
    }
    return text.replaceAll("\n", "\u21b5\n");
  }

  function tokenSpans(tokenizer, ids) {
    return ids.map((id, k) => el("span", {
      className: "llm-token", textContent: tokenText(tokenizer.tokenBytes(id)),
      title: `id ${id}`, style: `background:${COLOURS[k % COLOURS.length]}`,
    }));
  }

  // -- the tokenizer box ----------------------------------------------------------------
  async function tokenizerBox(box) {
    const text = el("textarea", {rows: 3, className: "llm-input",
                                 value: box.dataset.text || "Hello world, it's 2026!"});
    const panels = pairs(box.dataset.tokenizers).map(([file, label]) => ({
      file, label, head: el("div", {className: "llm-head"}),
      spans: el("div", {className: "llm-tokens"}),
      ids: el("div", {className: "llm-ids"}),
    }));
    box.append(text, ...panels.map((p) => el("div", {className: "llm-panel"},
                                            [p.head, p.spans, p.ids])));
    setState(box, "loading", "loading the tokenizers...");
    for (const p of panels) p.tokenizer = await loadTokenizer(p.file);
    const update = () => {
      for (const p of panels) {
        const ids = p.tokenizer.encodeOrdinary(text.value);
        p.head.textContent = `${p.label}: ${ids.length} tokens for ` +
                             `${new TextEncoder().encode(text.value).length} bytes`;
        p.spans.replaceChildren(...tokenSpans(p.tokenizer, ids));
        p.ids.textContent = `ids: [${ids.join(", ")}]`;
        p.ids.dataset.ids = JSON.stringify(ids);
      }
      setState(box, "done", "");
    };
    text.addEventListener("input", update);
    update();
  }

  // -- sampling controls, shared by the generation and the chat boxes -------------------
  function controls(defaults) {
    const number = (label, value, attrs) => {
      const input = el("input", {type: "number", value, ...attrs});
      return [input, el("label", {}, [label + " ", input])];
    };
    const [temperature, tLabel] = number("temperature", defaults.temperature,
                                         {min: 0.05, max: 3, step: 0.05});
    const [topK, kLabel] = number("top-k (0: all)", 0, {min: 0, step: 1});
    const [maxTokens, mLabel] = number("new tokens", defaults.maxTokens, {min: 1, step: 1});
    const [seed, sLabel] = number("seed", 0, {min: 0, step: 1});
    const greedy = el("input", {type: "checkbox"});
    const gLabel = el("label", {}, [greedy, " greedy (the most likely token, every time)"]);
    const labels = [tLabel, kLabel, sLabel, gLabel];
    if (defaults.showMax) labels.splice(2, 0, mLabel);
    return {
      row: el("div", {className: "llm-controls"}, labels),
      greedy, maxTokens,
      // the settings, checked: an Error says what is wrong
      options: () => {
        const t = Number(temperature.value);
        const k = Number(topK.value);
        const n = Number(maxTokens.value);
        if (!greedy.checked && !(t > 0 && t <= 100)) {
          throw new Error(`the temperature must be a number > 0 (tick greedy for the ` +
                          `argmax), got ${temperature.value}`);
        }
        if (!(Number.isInteger(k) && k >= 0)) {
          throw new Error(`top-k must be a whole number >= 0, got ${topK.value}`);
        }
        if (defaults.showMax && !(Number.isInteger(n) && n >= 1)) {
          throw new Error(`the number of new tokens must be a whole number >= 1, ` +
                          `got ${maxTokens.value}`);
        }
        return {greedy: greedy.checked, temperature: t, topK: k, maxTokens: n,
                random: llmGPT.seededRandom(Number(seed.value) || 0)};
      },
    };
  }

  // generate with the page kept responsive; calls show(token) after each new token
  // (the speed counts the time spent computing, not the pauses that let the page draw)
  async function run(box, model, ids, maxNewTokens, options, show) {
    let busySince = performance.now();
    let computing = 0;
    let count = 0;
    for (const token of llmGPT.generate(model, ids, maxNewTokens, options)) {
      count += 1;
      show(token);
      if (box.stopRequested) break;
      if (performance.now() - busySince > 30) {   // let the page draw the new tokens
        computing += performance.now() - busySince;
        await new Promise((resolve) => setTimeout(resolve, 0));
        busySince = performance.now();
      }
    }
    computing += performance.now() - busySince;
    const seconds = computing / 1000;
    box.dataset.tokensPerSecond = (count / seconds).toFixed(1);
    return `${count} new tokens in ${seconds.toFixed(2)} s: ` +
           `${(count / seconds).toFixed(0)} tokens per second, in your browser`;
  }

  // the go and stop buttons; `held` are controls that must not change during a run
  function buttons(box, held = []) {
    const go = el("button", {type: "button", className: "llm-go"});
    const stop = el("button", {type: "button", className: "llm-stop", textContent: "stop",
                               disabled: true});
    stop.addEventListener("click", () => { box.stopRequested = true; });
    const busy = (on) => {
      go.disabled = on;
      stop.disabled = !on;
      for (const control of held) control.disabled = on;
      box.stopRequested = false;
    };
    return {go, stop, busy};
  }

  // -- the generation box ---------------------------------------------------------------
  async function generateBox(box) {
    const prompt = el("textarea", {rows: 2, className: "llm-input",
                                   value: (box.dataset.prompt || "").replaceAll("\\n", "\n")});
    const ctl = controls({temperature: 0.8, maxTokens: 200, showMax: true});
    const {go, stop, busy} = buttons(box);
    go.textContent = "generate";
    const out = el("pre", {className: "llm-output"});
    box.append(prompt, ctl.row, el("div", {className: "llm-buttons"}, [go, stop]), out);
    setState(box, "loading", "loading the model...");
    const {model, tokenizer, megabytes} = await loadModel(box.dataset.model);
    const about = `The model: ${describe(model)}, ${megabytes.toFixed(1)} MB of weights.`;
    setState(box, "ready", about);
    go.addEventListener("click", async () => {
      let ids, options;
      try {
        ids = tokenizer.encode(prompt.value);
        if (ids.length === 0) throw new Error("write a prompt first");
        options = ctl.options();
      } catch (err) {
        setState(box, "error", err.message);
        return;
      }
      busy(true);
      setState(box, "running", "generating...");
      const generated = [];
      const written = el("span");
      out.replaceChildren(el("b", {textContent: tokenizer.decode(ids)}), written);
      const message = await run(box, model, ids, options.maxTokens, options,
                                (token) => {
                                  generated.push(token);
                                  written.textContent = tokenizer.decode(generated);
                                });
      out.dataset.ids = JSON.stringify(generated);
      busy(false);
      setState(box, "done", `${message}. ${about}`);
    });
  }

  // -- the chat box ---------------------------------------------------------------------
  async function chatBox(box) {
    const stages = pairs(box.dataset.models);
    const stage = el("select", {}, stages.map(([file, label]) =>
      el("option", {value: file, textContent: label})));
    stage.value = stages[stages.length - 1][0];
    const message = el("input", {type: "text", className: "llm-input",
                                 value: box.dataset.message || ""});
    const ctl = controls({temperature: 0.8});
    const {go, stop, busy} = buttons(box, [stage]);     // no switching stage mid-answer
    go.textContent = "send";
    const transcript = el("div", {className: "llm-transcript"});
    box.append(el("div", {className: "llm-controls"}, [el("label", {}, ["model ", stage])]),
               message, ctl.row, el("div", {className: "llm-buttons"}, [go, stop]),
               transcript);
    const load = async () => {
      setState(box, "loading", "loading the model...");
      const m = await loadModel(stage.value);
      m.about = `The model: ${describe(m.model)}, ${m.megabytes.toFixed(1)} MB of weights.`;
      setState(box, "ready", m.about);
      return m;
    };
    stage.addEventListener("change", () => load().catch((err) => setState(box, "error",
                                                                            err.message)));
    const send = async () => {
      const {model, tokenizer, template, about} = await load();
      const label = stage.selectedOptions[0].textContent;
      let ids, options;
      try {
        ids = [template["<|prompt|>"], ...tokenizer.encode(message.value),
               template["<|response|>"]];
        if (ids.length === 2) throw new Error("write a message first");
        options = ctl.options();
      } catch (err) {
        setState(box, "error", err.message);
        return;
      }
      const room = model.config.block_size - ids.length;
      if (room < 1) {
        setState(box, "error", `the message takes ${ids.length} tokens with the template's ` +
                 `markers; the model's window holds ${model.config.block_size}`);
        return;
      }
      // the answer ends at a special token: the template's four, or the tokenizer's own
      const base = template.base_vocab_size;
      const stopIds = [0, 1, 2, 3].map((i) => base + i)
        .concat(Object.values(tokenizer.special).filter((i) => i < base));
      const answer = [];
      const text = el("span");
      const reply = el("div", {className: "llm-reply"}, [el("b", {textContent: label + "> "}),
                                                          text]);
      transcript.append(el("div", {className: "llm-you"}, [el("b", {textContent: "you> "}),
                                                            message.value]), reply);
      busy(true);
      setState(box, "running", "answering...");
      const status = await run(box, model, ids, room, {...options, stopIds}, (token) => {
        answer.push(token);
        const end = answer.findIndex((t) => t >= base || stopIds.includes(t));
        text.textContent = tokenizer.decode(end < 0 ? answer : answer.slice(0, end));
      });
      reply.dataset.ids = JSON.stringify(answer);
      transcript.dataset.ids = reply.dataset.ids;
      busy(false);
      setState(box, "done", `${status}. ${about}`);
    };
    go.addEventListener("click", () => send().catch((err) => {
      busy(false);
      setState(box, "error", err.message);
    }));
    message.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !go.disabled) go.click();
    });
    await load();
  }

  const KINDS = {tokenizer: tokenizerBox, generate: generateBox, chat: chatBox};

  function start() {
    for (const box of document.querySelectorAll(".llm-box")) {
      const make = KINDS[box.dataset.box];
      box.replaceChildren(el("div", {className: "llm-status"}));
      if (!make) {
        setState(box, "error", `unknown box ${box.dataset.box}`);
        continue;
      }
      make(box).catch((err) => setState(box, "error", err.message));
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
