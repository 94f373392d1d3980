import fs from "node:fs";
import zlib from "node:zlib";
import OpenAI, { toFile } from "openai";
const base = process.env.BASE ?? "http://127.0.0.1:18902/v1";
const sent = [];
const mk = (key, o = {}) => new OpenAI({ baseURL: base, apiKey: key, maxRetries: 2, timeout: 1000,
  fetch: async (url, init) => { if (String(url).startsWith("http")) sent.push({url: String(url).replace(base, ""), retry: new Headers(init.headers).get("x-stainless-retry-count")}); return fetch(url, init); }, ...o });
const design = mk("tg_x_design");
function chunk(type, data) { const l = Buffer.alloc(4); l.writeUInt32BE(data.length); const b = Buffer.concat([Buffer.from(type, "latin1"), data]); const c = Buffer.alloc(4); c.writeUInt32BE(zlib.crc32(b)); return Buffer.concat([l, b, c]); }
function png(w, h, alpha = false) { const ch = alpha ? 4 : 3; const hd = Buffer.alloc(13); hd.writeUInt32BE(w, 0); hd.writeUInt32BE(h, 4); hd.set([8, alpha ? 6 : 2, 0, 0, 0], 8); const row = Buffer.alloc(1 + w * ch); const raw = Buffer.concat(Array.from({ length: h }, () => row)); return Buffer.concat([Buffer.from([0x89,0x50,0x4e,0x47,0x0d,0x0a,0x1a,0x0a]), chunk("IHDR", hd), chunk("IDAT", zlib.deflateSync(raw)), chunk("IEND", Buffer.alloc(0))]); }
const hdrs = (h) => Object.fromEntries([...h].filter(([n]) => n.startsWith("x-") || n === "retry-after"));
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
const tag = `${process.pid}`;
async function streamOf(p) { const { data, response } = await p.withResponse(); const ev = []; for await (const e of data) ev.push(e.type); return { h: hdrs(response.headers), ev }; }
const CASES = {
  gen_stream: () => streamOf(design.images.generate({ ...image, prompt: "s " + tag, stream: true, partial_images: 1 })),
  edit_stream_rs: async () => { fs.writeFileSync("/tmp/nx/a.png", png(512, 512)); return streamOf(design.images.edit({ ...image, prompt: "e " + tag, image: [fs.createReadStream("/tmp/nx/a.png"), fs.createReadStream("/tmp/nx/a.png")], stream: true, partial_images: 1 })); },
  edit_rs: async () => { fs.writeFileSync("/tmp/nx/a.png", png(512, 512)); const { data, response } = await design.images.edit({ ...image, prompt: "e2 " + tag, image: fs.createReadStream("/tmp/nx/a.png"), mask: await toFile(png(512,512,true), "m.png", {type: "image/png"}) }).withResponse(); return { h: hdrs(response.headers), n: data.data.length }; },
  variation: async () => { const { data, response } = await design.images.createVariation({ model: "dall-e-2", image: await toFile(png(256,256), "v.png", {type: "image/png"}), n: 1, size: "256x256" }).withResponse(); return { h: hdrs(response.headers), n: data.data.length }; },
  batch: async () => {
    const f = await design.files.create({ file: await toFile(Buffer.from(JSON.stringify({custom_id: "a", method: "POST", url: "/v1/images/generations", body: { ...image, prompt: "p " + tag }}) + "\n"), "l.jsonl"), purpose: "batch" });
    const { data: b, response } = await design.batches.create({ input_file_id: f.id, endpoint: "/v1/images/generations", completion_window: "24h" }).withResponse();
    return { f: f.id, b: b.id, h: hdrs(response.headers) };
  },
  resp_bg: async () => { const { data, response } = await design.responses.create({ model: "gpt-5.5", tools: [{ type: "image_generation", ...image }], max_output_tokens: 300, max_tool_calls: 1, input: "bg " + tag, background: true }).withResponse(); return { id: data.id, h: hdrs(response.headers) }; },
  resp_stream: () => streamOf(design.responses.create({ model: "gpt-5.5", tools: [{ type: "image_generation", ...image, partial_images: 1 }], max_output_tokens: 300, max_tool_calls: 1, input: "rs " + tag, stream: true })),
};
const out = {};
for (const name of (process.env.CASES ?? Object.keys(CASES).join(",")).split(",")) {
  const first = sent.length;
  try { out[name] = await CASES[name](); } catch (e) { out[name] = { thrown: String(e), status: e.status, error: e.error }; }
  out[name].sent = sent.slice(first);
}
console.log(JSON.stringify(out, null, 0));
