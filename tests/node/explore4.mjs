import fs from "node:fs";
import OpenAI, { toFile } from "openai";
const sent = [];
const mk = (key) => new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: key, maxRetries: 2,
  fetch: async (url, init) => { sent.push(String(url) + " " + new Headers(init.headers).get("x-stainless-retry-count")); return fetch(url, init); } });
const design = mk("tg_x_design"), strict = mk("tg_x_strict");
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
async function err(p) { try { const r = await p; return { ok: true, r }; } catch (e) { return { name: e.constructor.name, status: e.status, error: e.error, sr: e.headers?.get("x-should-retry") }; } }
const line = (i, body) => JSON.stringify({ custom_id: `c${i}`, method: "POST", url: "/v1/images/generations", body }) + "\n";
fs.writeFileSync("/tmp/nx/b.jsonl", line(1, { ...image, prompt: "a" }) + line(2, { ...image, prompt: "b", n: 2 }));
const f = await design.files.create({ file: fs.createReadStream("/tmp/nx/b.jsonl"), purpose: "batch" });
const out = { f };
out.processed = await design.files.waitForProcessing(f.id);
out.retrieved = await design.files.retrieve(f.id);
fs.writeFileSync("/tmp/nx/bad.jsonl", line(1, { ...image, prompt: "a" }) + line(2, { ...image, size: "13x13", prompt: "b" }) + "not json\n");
out.bad = await err(design.files.create({ file: fs.createReadStream("/tmp/nx/bad.jsonl"), purpose: "batch" }));
const b = await design.batches.create({ input_file_id: f.id, endpoint: "/v1/images/generations", completion_window: "24h", metadata: { k: "v" } });
out.other_batch = await err(strict.batches.retrieve(b.id));
out.other_cancel = await err(strict.batches.cancel(b.id));
out.other_file = await err(strict.files.content(f.id));
out.strict_batch = await err(strict.batches.create({ input_file_id: f.id, endpoint: "/v1/images/generations", completion_window: "24h" }));
out.wrong_ep = await err(design.batches.create({ input_file_id: f.id, endpoint: "/v1/images/edits", completion_window: "24h" }));
let got = b; while (!["completed","failed","expired","cancelled"].includes(got.status)) { await new Promise(r => setTimeout(r, 100)); got = await design.batches.retrieve(b.id); }
out.batch = { status: got.status, counts: got.request_counts, metadata: got.metadata, out: got.output_file_id, err: got.error_file_id };
out.content = (await (await design.files.content(got.output_file_id)).text()).split("\n").filter(Boolean).map(l => { const j = JSON.parse(l); return [j.custom_id, j.response.status_code, j.response.body.usage?.output_tokens]; });
out.del = await design.files.delete(f.id);
out.del_again = await err(design.files.retrieve(f.id));
out.cancel_done = await err(design.batches.cancel(b.id));
out.sent = sent.length;
console.log(JSON.stringify(out, null, 1));
