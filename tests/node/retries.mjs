// The official openai Node SDK retrying through a running Tollgate: a client timeout
// shorter than the upstream's rendering, the SDK's retries on, one request of the kind
// asked for. Prints what it got as JSON for tests/test_retries_e2e.py to check against
// the ledger and the simulator's billing.
//
//   TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 TOLLGATE_API_KEY=tg_... \
//   RETRY_KIND=generate|edit|responses PROMPT=... node retries.mjs
import OpenAI, { toFile } from "openai";

const client = new OpenAI({
  baseURL: process.env.TOLLGATE_BASE_URL,
  apiKey: process.env.TOLLGATE_API_KEY,
  timeout: Number(process.env.TIMEOUT_MS ?? 1000),
  maxRetries: 2,
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

const { data, response } = await ask(process.env.RETRY_KIND ?? "generate");
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
  }),
);
