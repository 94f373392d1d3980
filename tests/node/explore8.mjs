import zlib from "node:zlib";
import OpenAI, { toFile } from "openai";
const sent = [];
const c = new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: "tg_x_design", maxRetries: 0,
  fetch: async (u, init) => { if (init.body instanceof FormData) sent.push([...init.body.entries()].map(([n, v]) => typeof v === "string" ? [n, v] : [n, v.name, v.type, v.size])); return fetch(u, init); } });
function chunk(type, data) { const l = Buffer.alloc(4); l.writeUInt32BE(data.length); const b = Buffer.concat([Buffer.from(type, "latin1"), data]); const cc = Buffer.alloc(4); cc.writeUInt32BE(zlib.crc32(b)); return Buffer.concat([l, b, cc]); }
function png(w, h, alpha = false) { const ch = alpha ? 4 : 3; const hd = Buffer.alloc(13); hd.writeUInt32BE(w, 0); hd.writeUInt32BE(h, 4); hd.set([8, alpha ? 6 : 2, 0, 0, 0], 8); const row = Buffer.alloc(1 + w * ch); const raw = Buffer.concat(Array.from({ length: h }, () => row)); return Buffer.concat([Buffer.from([0x89,0x50,0x4e,0x47,0x0d,0x0a,0x1a,0x0a]), chunk("IHDR", hd), chunk("IDAT", zlib.deflateSync(raw)), chunk("IEND", Buffer.alloc(0))]); }
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
async function tryit(name, f) { try { const { data, response } = await (await f())[0].withResponse(); return [name, response.status, response.headers.get("x-tollgate-cost-usd"), data.usage?.input_tokens_details]; } catch (e) { return [name, e.status, e.message]; } }
const out = [];
out.push(await tryit("noname", async () => [c.images.edit({ ...image, prompt: "x", image: await toFile(png(512,512)) })]));
out.push(await tryit("File", async () => [c.images.edit({ ...image, prompt: "x", image: new File([png(512,512)], "f.png", { type: "image/png" }) })]));
out.push(await tryit("Blob-ish", async () => c.images.edit({ ...image, prompt: "x", image: await toFile(new Blob([png(512,512)]), "b.png") })));
out.push(await tryit("jpeg-named-png", async () => [c.images.edit({ ...image, prompt: "x", image: await toFile(png(512,512), "b.jpg", { type: "image/jpeg" }) })]));
out.push(await tryit("bg+compression", async () => [c.images.edit({ ...image, prompt: "x", image: await toFile(png(512,512), "b.png", {type: "image/png"}), background: "opaque", output_format: "jpeg", output_compression: 50, moderation: "low", user: "bob", input_fidelity: "low" })]));
out.push(await tryit("gen-all", async () => [c.images.generate({ ...image, prompt: "x", background: "opaque", output_format: "webp", output_compression: 70, moderation: "low", user: "bob", n: 2 })]));
out.push(await tryit("var-noname", async () => [c.images.createVariation({ image: await toFile(png(256,256)), n: 1, size: "256x256", response_format: "b64_json" })]));
out.push(await tryit("var-url", async () => [c.images.createVariation({ model: "dall-e-2", image: await toFile(png(256,256), "v.png", {type:"image/png"}), response_format: "url" })]));
console.log(JSON.stringify(out, null, 0).replaceAll("],[", "]\n["));
console.log(JSON.stringify(sent[0]));
