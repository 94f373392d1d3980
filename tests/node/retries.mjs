// The official openai Node SDK retrying through a running Tollgate: a client timeout
// shorter than the upstream's rendering, the SDK's retries on, one request of the kind
// asked for. Prints what it got as JSON for tests/test_retries_e2e.py to check against
// the ledger and the simulator's billing: the answer, or the error the SDK raised, and
// each attempt the SDK made.
//
//   TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 TOLLGATE_API_KEY=tg_... \
//   RETRY_KIND=generate|edit|responses|batch PROMPT=... node retries.mjs
import OpenAI, { toFile } from "openai";

// Each attempt the SDK made: its retry count, and the status it got (null: it gave up
// waiting).
const attempts = [];
const client = new OpenAI({
  baseURL: process.env.TOLLGATE_BASE_URL,
  apiKey: process.env.TOLLGATE_API_KEY,
  timeout: Number(process.env.TIMEOUT_MS ?? 1000),
  maxRetries: 2,
  fetch: async (url, init) => {
    const attempt = { retry_count: new Headers(init.headers).get("x-stainless-retry-count") };
    attempts.push(attempt);
    const response = await fetch(url, init);
    attempt.status = response.status;
    return response;
  },
});
const prompt = process.env.PROMPT ?? "A lighthouse, retried from Node";
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
// An 8x8 PNG: enough for the simulator to read its dimensions.
const PNG = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGPkEpFjwAaYsIoOWgkANVwATIkpP+sAAAAASUVORK5CYII=",
  "base64",
);

async function ask(kind) {
  if (kind === "generate") {
    return client.images.generate({ ...image, prompt }).withResponse();
  }
  if (kind === "edit") {
    const file = await toFile(PNG, "in.png", { type: "image/png" });
    return client.images.edit({ ...image, prompt, image: file }).withResponse();
  }
  if (kind === "batch") {
    const line = { custom_id: "one", method: "POST", url: "/v1/images/generations" };
    const jsonl = JSON.stringify({ ...line, body: { ...image, prompt } }) + "\n";
    const file = await client.files.create({
      file: await toFile(Buffer.from(jsonl), "lines.jsonl"),
      purpose: "batch",
    });
    const create = { input_file_id: file.id, endpoint: line.url, completion_window: "24h" };
    return client.batches.create(create).withResponse();
  }
  return client.responses
    .create({
      model: "gpt-5.5",
      input: prompt,
      tools: [{ type: "image_generation", ...image }],
      max_output_tokens: 300,
      max_tool_calls: 1,
    })
    .withResponse();
}

let answer;
try {
  answer = await ask(process.env.RETRY_KIND ?? "generate");
} catch (error) {
  if (!(error instanceof OpenAI.APIError)) throw error;
  console.log(
    JSON.stringify({
      error: {
        name: error.constructor.name,
        status: error.status ?? null,
        type: error.type ?? null,
        code: error.code ?? null,
        should_retry: error.headers?.get("x-should-retry") ?? null,
        request_id: error.headers?.get("x-tollgate-request-id") ?? null,
        replay_of: error.headers?.get("x-tollgate-replay-of") ?? null,
      },
      attempts,
    }),
  );
  process.exit(0);
}
const { data, response } = answer;
const b64 =
  data.data?.[0]?.b64_json ??
  data.output?.find((item) => item.type === "image_generation_call")?.result ??
  null;
console.log(
  JSON.stringify({
    request_id: response.headers.get("x-tollgate-request-id"),
    replay_of: response.headers.get("x-tollgate-replay-of"),
    cost_usd: response.headers.get("x-tollgate-cost-usd"),
    id: data.id ?? null,
    b64,
    attempts,
  }),
);
