import OpenAI, { toFile } from "openai";
const c = new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: "tg_x_capped", maxRetries: 0 });
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
const hdrs = (h) => Object.fromEntries([...h].filter(([n]) => n.startsWith("x-tollgate")));
const out = {};
let r = await c.images.generate({ ...image, prompt: "a", user: "alice" }).withResponse(); out.gen = hdrs(r.response.headers);
r = await c.images.generate({ ...image, prompt: "a", stream: true }).withResponse(); out.gen_stream = hdrs(r.response.headers); for await (const e of r.data) {}
r = await c.responses.create({ model: "gpt-5.5", tools: [{ type: "image_generation", ...image }], max_output_tokens: 300, max_tool_calls: 1, input: "x" }).withResponse(); out.resp = hdrs(r.response.headers);
r = await c.responses.create({ model: "gpt-5.5", tools: [{ type: "image_generation", ...image }], input: "x" }).withResponse(); out.resp_injected = hdrs(r.response.headers);
const f = await c.files.create({ file: await toFile(Buffer.from(JSON.stringify({custom_id: "a", method: "POST", url: "/v1/images/generations", body: { ...image, prompt: "p" }}) + "\n"), "l.jsonl"), purpose: "batch" }).withResponse();
out.file = hdrs(f.response.headers);
r = await c.batches.create({ input_file_id: f.data.id, endpoint: "/v1/images/generations", completion_window: "24h" }).withResponse(); out.batch = hdrs(r.response.headers);
r = await c.batches.retrieve(r.data.id).withResponse(); out.batch_get = hdrs(r.response.headers);
console.log(JSON.stringify(out, null, 1));
