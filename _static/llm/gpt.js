// gpt.js: the course's GPT (lessons_lib/model.py) in plain JavaScript, read top to bottom.
//
// The same arithmetic as GPT.forward in PyTorch, for one sequence, one token at a time:
// token and position embeddings, n_layer pre-LayerNorm blocks (x + attn(ln_1(x)), then
// x + mlp(ln_2(x))), the final LayerNorm ln_f and the head. Every vector is a Float32Array,
// as in PyTorch's float32; sums are taken in JavaScript's float64 and rounded when stored.
// Keys and values of earlier positions stay in a cache, so each new token costs one position.
// The weights come from a safetensors file written by lessons_lib.web.export_gpt, with the
// same names as the PyTorch model's parameters.
"use strict";

// -----------------------------------------------------------------------------
// 1. reading a safetensors file: 8 bytes (the header's length), a JSON header, the tensors

function readSafetensors(buffer) {
  const view = new DataView(buffer);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, n)));
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (info.dtype !== "F32") {
      throw new Error(`${name}: expected a float32 tensor, got ${info.dtype}`);
    }
    const [begin, end] = info.data_offsets;
    // a copy: a Float32Array must start at a multiple of 4 bytes
    const data = new Float32Array(buffer.slice(8 + n + begin, 8 + n + end));
    tensors[name] = {shape: info.shape, data};
  }
  return {tensors, metadata: header.__metadata__ || {}};
}

// -----------------------------------------------------------------------------
// 2. the pieces: Linear, LayerNorm, GELU

// y = W x + b, with W of shape (nOut, nIn) stored row by row, as in nn.Linear
function linear(x, W, b, nOut) {
  const nIn = x.length;
  const y = new Float32Array(nOut);
  for (let o = 0; o < nOut; o++) {
    const row = o * nIn;
    // four running sums: the same dot product, about twice as fast in JavaScript
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    let i = 0;
    for (; i + 3 < nIn; i += 4) {
      s0 += W[row + i] * x[i];
      s1 += W[row + i + 1] * x[i + 1];
      s2 += W[row + i + 2] * x[i + 2];
      s3 += W[row + i + 3] * x[i + 3];
    }
    for (; i < nIn; i++) s0 += W[row + i] * x[i];
    y[o] = (b ? b[o] : 0) + (s0 + s1) + (s2 + s3);
  }
  return y;
}

// (x - mean) / sqrt(var + eps) * g + b, the variance without Bessel's correction
function layerNorm(x, g, b, eps = 1e-5) {
  const n = x.length;
  let mean = 0;
  for (let i = 0; i < n; i++) mean += x[i];
  mean /= n;
  let variance = 0;
  for (let i = 0; i < n; i++) variance += (x[i] - mean) ** 2;
  variance /= n;
  const scale = 1 / Math.sqrt(variance + eps);
  const y = new Float32Array(n);
  for (let i = 0; i < n; i++) y[i] = (x[i] - mean) * scale * g[i] + (b ? b[i] : 0);
  return y;
}

// GELU with the tanh approximation, GPT-2's (nn.GELU(approximate="tanh")), in place
function gelu(x) {
  const c = Math.sqrt(2 / Math.PI);
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    x[i] = 0.5 * v * (1 + Math.tanh(c * (v + 0.044715 * v * v * v)));
  }
  return x;
}

// -----------------------------------------------------------------------------
// 3. the GPT

class GPT {
  // config: {vocab_size, block_size, n_layer, n_head, n_embd}; tensors: name -> Float32Array
  constructor(config, tensors) {
    this.config = config;
    // every tensor counted once (a tied head is the token table)
    this.numParameters = Object.values(tensors).reduce((n, t) => n + t.length, 0);
    const get = (name) => {
      if (!(name in tensors)) throw new Error(`the weights have no tensor ${name}`);
      return tensors[name];
    };
    const maybe = (name) => tensors[name];       // biases: absent when bias=False
    this.wte = get("wte.weight");                // (vocab_size, n_embd)
    this.wpe = get("wpe.weight");                // (block_size, n_embd)
    this.lm_head = tensors["lm_head.weight"] || this.wte;   // tied: the token table
    this.h = [];
    for (let l = 0; l < config.n_layer; l++) {
      const p = `h.${l}.`;
      this.h.push({
        ln_1: [get(p + "ln_1.weight"), maybe(p + "ln_1.bias")],
        c_attn: [get(p + "attn.c_attn.weight"), maybe(p + "attn.c_attn.bias")],
        attn_proj: [get(p + "attn.c_proj.weight"), maybe(p + "attn.c_proj.bias")],
        ln_2: [get(p + "ln_2.weight"), maybe(p + "ln_2.bias")],
        c_fc: [get(p + "mlp.c_fc.weight"), maybe(p + "mlp.c_fc.bias")],
        mlp_proj: [get(p + "mlp.c_proj.weight"), maybe(p + "mlp.c_proj.bias")],
      });
    }
    this.ln_f = [get("ln_f.weight"), maybe("ln_f.bias")];
    // the cache: every layer's keys and values, one row of n_embd per position
    const size = config.block_size * config.n_embd;
    this.k = this.h.map(() => new Float32Array(size));
    this.v = this.h.map(() => new Float32Array(size));
    this.pos = 0;                                // positions the cache holds
  }

  static fromSafetensors(buffer) {
    const {tensors, metadata} = readSafetensors(buffer);
    const config = JSON.parse(metadata.config);
    const data = {};
    for (const [name, t] of Object.entries(tensors)) data[name] = t.data;
    const model = new GPT(config, data);
    model.metadata = metadata;
    return model;
  }

  reset() {
    this.pos = 0;
  }

  // causal self-attention of the position this.pos over positions 0..pos of the cache
  attend(l, x) {
    const {n_head, n_embd} = this.config;
    const hd = n_embd / n_head;
    const [W, b] = this.h[l].c_attn;
    const qkv = linear(x, W, b, 3 * n_embd);       // q | k | v, each n_embd wide
    const t = this.pos;
    this.k[l].set(qkv.subarray(n_embd, 2 * n_embd), t * n_embd);
    this.v[l].set(qkv.subarray(2 * n_embd), t * n_embd);
    const y = new Float32Array(n_embd);
    const scores = new Float64Array(t + 1);
    for (let h = 0; h < n_head; h++) {
      const q = h * hd;                           // head h's features: q..q + hd
      let max = -Infinity;
      for (let s = 0; s <= t; s++) {
        let dot = 0;
        const k = s * n_embd + q;
        for (let i = 0; i < hd; i++) dot += qkv[q + i] * this.k[l][k + i];
        scores[s] = dot / Math.sqrt(hd);
        max = Math.max(max, scores[s]);
      }
      let total = 0;
      for (let s = 0; s <= t; s++) {
        scores[s] = Math.exp(scores[s] - max);    // softmax, shifted by the max
        total += scores[s];
      }
      for (let i = 0; i < hd; i++) {
        let sum = 0;
        for (let s = 0; s <= t; s++) sum += scores[s] * this.v[l][s * n_embd + q + i];
        y[q + i] = sum / total;
      }
    }
    const [Wo, bo] = this.h[l].attn_proj;
    return linear(y, Wo, bo, n_embd);
  }

  // one token at position this.pos; returns the next token's logits (or null if !wantLogits)
  step(token, wantLogits = true) {
    const {vocab_size, block_size, n_embd} = this.config;
    if (!(Number.isInteger(token) && token >= 0 && token < vocab_size)) {
      throw new Error(`token ${token} is outside the vocabulary 0..${vocab_size - 1}`);
    }
    if (this.pos >= block_size) {
      throw new Error(`position ${this.pos} does not fit block_size=${block_size}`);
    }
    let x = new Float32Array(n_embd);
    for (let i = 0; i < n_embd; i++) {
      x[i] = this.wte[token * n_embd + i] + this.wpe[this.pos * n_embd + i];
    }
    for (let l = 0; l < this.h.length; l++) {
      const layer = this.h[l];
      const a = this.attend(l, layerNorm(x, ...layer.ln_1));
      for (let i = 0; i < n_embd; i++) x[i] += a[i];
      const hidden = gelu(linear(layerNorm(x, ...layer.ln_2), ...layer.c_fc, 4 * n_embd));
      const m = linear(hidden, ...layer.mlp_proj, n_embd);
      for (let i = 0; i < n_embd; i++) x[i] += m[i];
    }
    this.pos += 1;
    if (!wantLogits) return null;
    return linear(layerNorm(x, ...this.ln_f), this.lm_head, null, vocab_size);
  }

  // read ids from position 0 (the cache starts empty); returns the last position's logits
  prefill(ids) {
    if (ids.length === 0) throw new Error("the prompt has no tokens");
    this.reset();
    let logits = null;
    ids.forEach((t, i) => {
      logits = this.step(t, i === ids.length - 1);
    });
    return logits;
  }
}

// -----------------------------------------------------------------------------
// 4. choosing the next token, and generation

// the argmax (the first of equal maxima, as torch.argmax), or a draw from
// softmax(logits / temperature) over the topK most likely tokens (ties with the k-th kept)
function pickToken(logits, {greedy = false, temperature = 1, topK = 0, random = Math.random}) {
  if (greedy) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    return best;
  }
  let cut = -Infinity;
  if (topK > 0 && topK < logits.length) {
    cut = Array.from(logits).sort((a, b) => b - a)[topK - 1];
  }
  let max = -Infinity;
  for (const z of logits) max = Math.max(max, z);
  const p = new Float64Array(logits.length);
  let total = 0;
  for (let i = 0; i < logits.length; i++) {
    p[i] = logits[i] >= cut ? Math.exp((logits[i] - max) / temperature) : 0;
    total += p[i];
  }
  let u = random() * total;
  for (let i = 0; i < p.length; i++) {
    u -= p[i];
    if (u < 0 && p[i] > 0) return i;
  }
  return p.findLastIndex((q) => q > 0);
}

// a random number generator with a seed (mulberry32): the same seed, the same draws
function seededRandom(seed) {
  let a = seed >>> 0;
  return function () {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// lessons_lib.generate.generate for one sequence: yields up to maxNewTokens tokens, ending
// after one of stopIds. The model reads at most its block_size last tokens: while they fit,
// each new token is one step with the cache; past that the window slides and is read again
// from position 0, as in PyTorch.
function* generate(model, ids, maxNewTokens, options = {}) {
  const blockSize = model.config.block_size;
  const stops = new Set(options.stopIds || []);
  const context = ids.slice();
  let logits = model.prefill(context.slice(-blockSize));
  for (let n = 0; n < maxNewTokens; n++) {
    const token = pickToken(logits, options);
    yield token;
    if (stops.has(token)) return;
    context.push(token);
    logits = context.length <= blockSize ? model.step(token)
      : model.prefill(context.slice(-blockSize));
  }
}

const llmGPT = {readSafetensors, linear, layerNorm, gelu, GPT, pickToken, seededRandom,
                generate};
if (typeof module !== "undefined") module.exports = llmGPT;
else globalThis.llmGPT = llmGPT;
