// The official openai Node SDK against a running Tollgate: one plain response, one
// stream and one background response (retrieved until it ends), printed as JSON for
// tests/test_responses_e2e.py to check against the ledger.
//
//   TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 TOLLGATE_API_KEY=tg_... node responses.mjs
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.TOLLGATE_BASE_URL,
  apiKey: process.env.TOLLGATE_API_KEY,
  maxRetries: 0,
});
const ask = {
  model: process.env.MAINLINE_MODEL ?? "gpt-5.5",
  tools: [{ type: "image_generation", model: process.env.IMAGE_MODEL ?? "gpt-image-2",
            quality: "low", size: "1024x1024" }],
  max_output_tokens: 300,
  max_tool_calls: 1,
};
const TERMINAL = new Set(["completed", "failed", "incomplete", "cancelled"]);

async function plain() {
  const { data, response } = await client.responses
    .create({ ...ask, input: "A lighthouse, from Node" })
    .withResponse();
  return {
    id: data.id,
    status: data.status,
    cost_usd: response.headers.get("x-tollgate-cost-usd"),
    request_id: response.headers.get("x-tollgate-request-id"),
  };
}

async function streamed() {
  const stream = await client.responses.create({
    ...ask,
    input: "A harbour, streamed from Node",
    stream: true,
  });
  let id = null;
  let status = null;
  let events = 0;
  for await (const event of stream) {
    events += 1;
    if (event.type === "response.completed") {
      id = event.response.id;
      status = event.response.status;
    }
  }
  return { id, status, events };
}

async function background() {
  const queued = await client.responses.create({
    ...ask,
    input: "A comet, in the background from Node",
    background: true,
  });
  const deadline = Date.now() + 60_000;
  let found = queued;
  while (!TERMINAL.has(found.status)) {
    if (Date.now() > deadline) throw new Error(`${queued.id} did not end within 60 s`);
    await new Promise((resolve) => setTimeout(resolve, 100));
    found = await client.responses.retrieve(queued.id);
  }
  return { id: queued.id, queued: queued.status, status: found.status };
}

const results = {
  plain: await plain(),
  stream: await streamed(),
  background: await background(),
};
console.log(JSON.stringify(results));
