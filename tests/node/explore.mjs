import fs from "node:fs";
import zlib from "node:zlib";
import OpenAI, { toFile } from "openai";
const base = process.env.BASE ?? "http://127.0.0.1:18902/v1";
const sent = [];
const mk = (key, o = {}) => new OpenAI({ baseURL: base, apiKey: key, maxRetries: 0,
  fetch: async (url, init) => { if (String(url).startsWith("http")) sent.push({url: String(url), retry: new Headers(init.headers).get("x-stainless-retry-count")}); return fetch(url, init); }, ...o });
const design = mk("tg_x_design");
function chunk(type, data) { const l = Buffer.alloc(4); l.writeUInt32BE(data.length); const b = Buffer.concat([Buffer.from(type, "latin1"), data]); const c = Buffer.alloc(4); c.writeUInt32BE(zlib.crc32(b)); return Buffer.concat([l, b, c]); }
function png(w, h, alpha = false) { const ch = alpha ? 4 : 3; const hd = Buffer.alloc(13); hd.writeUInt32BE(w, 0); hd.writeUInt32BE(h, 4); hd.set([8, alpha ? 6 : 2, 0, 0, 0], 8); const row = Buffer.alloc(1 + w * ch); const raw = Buffer.concat(Array.from({ length: h }, () => row)); return Buffer.concat([Buffer.from([0x89,0x50,0x4e,0x47,0x0d,0x0a,0x1a,0x0a]), chunk("IHDR", hd), chunk("IDAT", zlib.deflateSync(raw)), chunk("IEND", Buffer.alloc(0))]); }
const hdrs = (h) => Object.fromEntries([...h].filter(([n]) => n.startsWith("x-") || n === "retry-after"));
async function err(p) { try { const r = await p; return { ok: true, r }; } catch (e) { return { name: e.constructor.name, status: e.status, error: e.error, code: e.code, type: e.type, param: e.param, headers: e.headers ? hdrs(e.headers) : null, msg: e.message }; } }
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
const CASES = {
  readstream: async () => {
    fs.writeFileSync("/tmp/nx/a.png", png(1024, 1024)); fs.writeFileSync("/tmp/nx/m.png", png(1024, 1024, true));
    const { data, response } = await design.images.edit({ ...image, prompt: "x", image: [fs.createReadStream("/tmp/nx/a.png"), fs.createReadStream("/tmp/nx/a.png")], mask: fs.createReadStream("/tmp/nx/m.png") }).withResponse();
    return { status: response.status, h: hdrs(response.headers), n: data.data.length, usage: data.usage };
  },
  errors: async () => ({
    nokey: await err(mk("tg_nope").images.generate({ ...image, prompt: "x" })),
    badsize: await err(design.images.generate({ ...image, size: "1000x1000", prompt: "x" })),
    noprompt: await err(design.images.generate({ ...image })),
    unpriced: await err(design.images.generate({ ...image, model: "gpt-image-9", prompt: "x" })),
    policy: await err(mk("tg_x_strict", {maxRetries: 2}).images.generate({ ...image, model: "gpt-image-1", prompt: "x" })),
    policy_ep: await err(mk("tg_x_strict", {maxRetries: 2}).images.edit({ ...image, prompt: "x", image: await toFile(png(64,64), "a.png", {type: "image/png"}) })),
    budget: await err(mk("tg_x_broke", {maxRetries: 2}).images.generate({ ...image, prompt: "x" })),
    notfound: await err(design.models.list()),
    big: await err(design.images.generate({ ...image, prompt: "x".repeat(1100000) })),
    n_bad: await err(design.images.generate({ ...image, n: 20, prompt: "x" })),
    partial_nostream: await err(design.images.generate({ ...image, partial_images: 2, prompt: "x" })),
    sent: sent.length,
  }),
  batchlist: async () => {
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const f = await design.files.create({ file: await toFile(Buffer.from(JSON.stringify({custom_id: "a", method: "POST", url: "/v1/images/generations", body: { ...image, prompt: "p" }}) + "\n"), "l.jsonl"), purpose: "batch" });
      const b = await design.batches.create({ input_file_id: f.id, endpoint: "/v1/images/generations", completion_window: "24h" });
      ids.push(b.id);
    }
    const listed = [];
    for await (const b of design.batches.list({ limit: 1 })) listed.push(b.id);
    const files = [];
    for await (const f of design.files.list({ limit: 2 })) files.push(f.id);
    const page = await design.batches.list({ limit: 2 });
    return { ids, listed, files, page: { has_more: page.has_more, n: page.data.length, hasNext: page.hasNextPage() } };
  },
  bg_stream: async () => {
    const ask = { model: "gpt-5.5", tools: [{ type: "image_generation", ...image, partial_images: 2 }], max_output_tokens: 300, max_tool_calls: 1 };
    const stream = await design.responses.create({ ...ask, input: "bg", background: true, stream: true });
    const types = []; let id = null;
    for await (const ev of stream) { types.push([ev.type, ev.sequence_number]); if (ev.response?.id) id = ev.response.id; if (types.length === 3) break; }
    const resumed = await design.responses.retrieve(id, { stream: true, starting_after: 2 });
    const more = [];
    for await (const ev of resumed) more.push([ev.type, ev.sequence_number]);
    return { id, types, more };
  },
};
const out = {};
for (const name of (process.env.CASES ?? Object.keys(CASES).join(",")).split(",")) {
  try { out[name] = await CASES[name](); } catch (e) { out[name] = { thrown: String(e), status: e.status, error: e.error }; }
}
console.log(JSON.stringify(out, null, 1));
