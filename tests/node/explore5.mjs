import OpenAI from "openai";
const mk = (key) => new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: key, maxRetries: 0 });
const design = mk("tg_x_design"), strict = mk("tg_x_strict");
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
async function err(p) { try { const r = await p; return { ok: true }; } catch (e) { return { name: e.constructor.name, status: e.status, error: e.error }; } }
const ask = { model: "gpt-5.5", tools: [{ type: "image_generation", ...image, partial_images: 1 }], max_output_tokens: 300, max_tool_calls: 1 };
const out = {};
const bg = await design.responses.create({ ...ask, input: "bg helper", background: true });
out.other_stream = await err((async () => { const s = await strict.responses.retrieve(bg.id, { stream: true }); for await (const e of s) {} })());
const helper = design.responses.stream({ response_id: bg.id, starting_after: 3 });
const seqs = []; helper.on("event", (e) => seqs.push(e.sequence_number));
try { const fin = await helper.finalResponse(); out.helper = { status: fin.status, first: seqs[0], n: seqs.length, images: fin.output.filter(o => o.type === "image_generation_call").length }; } catch (e) { out.helper = { err: String(e), first: seqs[0], n: seqs.length }; }
const plain = await design.responses.create({ ...ask, tools: [{ type: "image_generation", ...image }], input: "plain" });
out.plain_stream = await err((async () => { const s = await design.responses.retrieve(plain.id, { stream: true }); let n = 0; for await (const e of s) n++; return n; })());
out.del = await design.responses.delete(plain.id).then(() => "deleted", (e) => String(e));
out.del_other = await err(strict.responses.delete(bg.id));
out.items_other = await err(strict.responses.inputItems.list(bg.id));
out.conversation = await err(design.responses.create({ ...ask, input: "c", conversation: "conv_123" }));
console.log(JSON.stringify(out, null, 1));
