// tokenizers.js: the course's tokenizers (lessons_lib/tokenizers.py) in plain JavaScript.
//
// BPETokenizer is byte-level BPE with GPT-2's pre-tokenization: the text is cut into chunks
// by GPT-2's regular expression, each chunk written as UTF-8 bytes, and inside a chunk the
// pair that was merged earliest in training is merged first, again and again. It reads what
// lessons_lib's BPETokenizer.to_dict() writes, for the course's own tokenizers and GPT-2's.
// CharTokenizer gives each character of its vocabulary one id.
"use strict";

// GPT-2's split pattern (lessons_lib.tokenizers.GPT2_SPLIT_PATTERN). JavaScript's \s is not
// Python's: it has U+FEFF and lacks U+0085, so whitespace is spelled out as the `regex`
// module reads \s (the Unicode White_Space characters).
const GPT2_SPLIT_PATTERN =
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const WS = "\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const GPT2_SPLIT = new RegExp(
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+` +
  `|[${WS}]+(?![^${WS}])|[${WS}]+`, "gu");

const utf8 = new TextEncoder();

class BPETokenizer {
  // data: BPETokenizer.to_dict() of lessons_lib
  constructor(data) {
    if (data.format !== "lessons_lib.BPETokenizer/1") {
      throw new Error(`expected a BPETokenizer.to_dict(), got format ${data.format}`);
    }
    if (data.pattern !== GPT2_SPLIT_PATTERN) {
      throw new Error("this tokenizer splits with another pattern than GPT-2's");
    }
    this.byteIds = data.byte_ids;                 // the id of each byte value (or null)
    this.merges = new Map();                      // "a,b" -> [rank, new id]
    this.vocab = new Map();                       // id -> its bytes
    this.byteIds.forEach((id, b) => {
      if (id !== null) this.vocab.set(id, Uint8Array.of(b));
    });
    data.merges.forEach(([a, b, id], rank) => {
      this.merges.set(`${a},${b}`, [rank, id]);
      const bytes = new Uint8Array(this.vocab.get(a).length + this.vocab.get(b).length);
      bytes.set(this.vocab.get(a));
      bytes.set(this.vocab.get(b), this.vocab.get(a).length);
      this.vocab.set(id, bytes);
    });
    this.special = data.special_tokens;           // name -> id
    for (const [name, id] of Object.entries(this.special)) {
      this.vocab.set(id, utf8.encode(name));
    }
    this.vocabSize = this.vocab.size;
    this.cache = new Map();
  }

  encodeChunk(chunk) {
    if (this.cache.has(chunk)) return this.cache.get(chunk);
    let ids = Array.from(utf8.encode(chunk), (b) => {
      const id = this.byteIds[b];
      if (id === null) {
        throw new Error(`the byte 0x${b.toString(16)} has no token in this vocabulary`);
      }
      return id;
    });
    while (ids.length >= 2) {
      // the pair merged earliest in training, then every occurrence of it, left to right
      let best = null;
      for (let i = 0; i + 1 < ids.length; i++) {
        const m = this.merges.get(`${ids[i]},${ids[i + 1]}`);
        if (m && (best === null || m[0] < best[0])) best = [m[0], m[1], ids[i], ids[i + 1]];
      }
      if (best === null) break;
      const [, id, a, b] = best;
      const merged = [];
      for (let i = 0; i < ids.length; i++) {
        if (i + 1 < ids.length && ids[i] === a && ids[i + 1] === b) {
          merged.push(id);
          i++;
        } else {
          merged.push(ids[i]);
        }
      }
      ids = merged;
    }
    this.cache.set(chunk, ids);
    return ids;
  }

  // special-token names are plain text here, as in encode_ordinary()
  encodeOrdinary(text) {
    const ids = [];
    for (const [chunk] of text.matchAll(GPT2_SPLIT)) ids.push(...this.encodeChunk(chunk));
    return ids;
  }

  // as lessons_lib's encode(text): a special-token name in the text is an error
  encode(text) {
    for (const name of Object.keys(this.special)) {
      if (text.includes(name)) throw new Error(`the text contains the special token ${name}`);
    }
    return this.encodeOrdinary(text);
  }

  tokenBytes(id) {
    const bytes = this.vocab.get(id);
    if (bytes === undefined) throw new Error(`id ${id} is not in the vocabulary`);
    return bytes;
  }

  // the bytes of ids, as text: bytes that are not valid UTF-8 become U+FFFD
  decode(ids) {
    const parts = ids.map((id) => this.tokenBytes(id));
    const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    return new TextDecoder().decode(all);
  }
}

class CharTokenizer {
  // data: {format: "lessons_lib.CharTokenizer/1", chars: [...]}
  constructor(data) {
    this.chars = data.chars;
    this.stoi = new Map(this.chars.map((c, i) => [c, i]));
    this.vocabSize = this.chars.length;
    this.special = {};
  }

  encode(text) {
    return Array.from(text, (c, i) => {
      if (!this.stoi.has(c)) {
        throw new Error(`the character ${JSON.stringify(c)} at position ${i} is not in ` +
                        `this tokenizer's vocabulary of ${this.vocabSize} characters`);
      }
      return this.stoi.get(c);
    });
  }

  tokenBytes(id) {
    return utf8.encode(this.chars[id]);
  }

  decode(ids) {
    return ids.map((i) => this.chars[i]).join("");
  }
}

function tokenizerFromDict(data) {
  if (data.format === "lessons_lib.CharTokenizer/1") return new CharTokenizer(data);
  return new BPETokenizer(data);
}

const llmTokenizers = {GPT2_SPLIT_PATTERN, GPT2_SPLIT, BPETokenizer, CharTokenizer,
                       tokenizerFromDict};
if (typeof module !== "undefined") module.exports = llmTokenizers;
else globalThis.llmTokenizers = llmTokenizers;
