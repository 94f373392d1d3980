import OpenAI from "openai";
const log = [];
const design = new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: "tg_x_design", maxRetries: 0, fetch: async (u, i) => { log.push(i.method + " " + String(u)); return fetch(u, i); } });
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
const ask = { model: "gpt-5.5", tools: [{ type: "image_generation", ...image, partial_images: 1 }], max_output_tokens: 300, max_tool_calls: 1 };
const out = {};
for (const streamCreate of [false, true]) {
  const created = await design.responses.create({ ...ask, input: "bg " + streamCreate, background: true, stream: streamCreate });
  let id;
  if (streamCreate) { for await (const e of created) { if (e.response?.id) { id = e.response.id; break; } } } else id = created.id;
  for (const how of ["retrieve", "helper"]) {
    try {
      let n = 0, first = null;
      if (how === "retrieve") { const s = await design.responses.retrieve(id, { stream: true, starting_after: 1 }); for await (const e of s) { n++; first ??= e.sequence_number; } }
      else { const h = design.responses.stream({ response_id: id, starting_after: 1 }); h.on("event", (e) => { n++; first ??= e.sequence_number; }); await h.finalResponse(); }
      out[`${streamCreate}/${how}`] = { n, first };
    } catch (e) { out[`${streamCreate}/${how}`] = { err: String(e), status: e.status, code: e.code }; }
  }
}
console.log(JSON.stringify(out, null, 1)); console.log(log.join("\n"));
