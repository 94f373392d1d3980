// The official openai Node SDK using the Batch and Files doors of a running Tollgate as a
// team would: `files.create` with `toFile(...)` (a JSONL of Images API lines, one of
// Responses API lines with the image_generation tool, `vision` and `user_data` files),
// `batches.create`, `batches.retrieve` until the batch ends, `files.content` of its
// output read back, `batches.list` and `files.list` page by page, `batches.cancel`,
// `files.retrieve`, `files.delete`, an edit naming an uploaded file by its id, and the
// refusals the SDK raises as its typed errors. Prints one JSON object, a result per case
// asked for, for tests/test_node_batches_e2e.py to check against the ledger and the
// simulator's billing.
//
//   TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 \
//   TOLLGATE_KEYS='{"design": "tg_...", "research": "tg_..."}' \
//   CASES=generations,listed node batches.mjs
import zlib from "node:zlib";
import OpenAI, { toFile } from "openai";

const KEYS = JSON.parse(process.env.TOLLGATE_KEYS);
const HEADERS = [
  "x-request-id",
  "x-should-retry",
  "x-tollgate-replay-of",
  "x-tollgate-budget-remaining-usd",
  "x-tollgate-cost-usd",
  "x-tollgate-model",
  "x-tollgate-request-id",
  "x-tollgate-reserved-usd",
  "x-tollgate-team",
];
const ENDED = ["completed", "failed", "expired", "cancelled"];

// What the SDK handed to fetch, each attempt: method, URL, the headers that differ from
// the Python SDK's, and the multipart field names in order.
const sent = [];

function client(key, options = {}) {
  return new OpenAI({
    baseURL: process.env.TOLLGATE_BASE_URL,
    apiKey: key,
    maxRetries: 0,
    fetch: async (url, init) => {
      // The SDK's probe of FormData support fetches a `data:` URL: not a request.
      if (String(url).startsWith("http")) {
        const headers = new Headers(init.headers);
        sent.push({
          url: String(url),
          method: init.method,
          retry_count: headers.get("x-stainless-retry-count"),
          timeout: headers.get("x-stainless-timeout"),
          accept: headers.get("accept"),
          lang: headers.get("x-stainless-lang"),
          idempotency_key: headers.get("idempotency-key"),
          content_type: headers.get("content-type"),
          fields:
            init.body instanceof FormData
              ? [...init.body.entries()].map(([name, value]) =>
                  typeof value === "string" ? [name, value] : [name, { filename: value.name }],
                )
              : null,
        });
      }
      return fetch(url, init);
    },
    ...options,
  });
}

function picked(headers) {
  return Object.fromEntries(HEADERS.map((name) => [name, headers?.get(name) ?? null]));
}

async function answered(request) {
  const { data, response } = await request.withResponse();
  return { status: response.status, headers: picked(response.headers), body: data };
}

async function refused(request) {
  try {
    await request;
  } catch (error) {
    if (!(error instanceof OpenAI.APIError)) throw error;
    return {
      error: error.constructor.name,
      status: error.status,
      type: error.type ?? null,
      code: error.code ?? null,
      param: error.param ?? null,
      message: error.message,
      body: error.error ?? null,
      headers: picked(error.headers),
    };
  }
  throw new Error("the request was not refused");
}

async function ended(sdk, id) {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const batch = await sdk.batches.retrieve(id);
    if (ENDED.includes(batch.status)) return batch;
    if (Date.now() > deadline) throw new Error(`batch ${id} did not end`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The JSONL lines of a file, read back with `files.content`, parsed. */
async function lines(sdk, fileId) {
  const response = await sdk.files.content(fileId);
  const text = await response.text();
  return {
    status: response.status,
    headers: picked(response.headers),
    content_type: response.headers.get("content-type"),
    lines: text
      .split("\n")
      .filter(Boolean)
      .map((line) => JSON.parse(line)),
  };
}

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "latin1"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(body));
  return Buffer.concat([length, body, crc]);
}

/** A real 8-bit RGB PNG of one colour. */
function png(width, height) {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8);
  const row = Buffer.alloc(1 + width * 3);
  for (let x = 0; x < width; x++) row.set([10, 20, 30], 1 + x * 3);
  const raw = Buffer.concat(Array.from({ length: height }, () => row));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", header),
    chunk("IDAT", zlib.deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

// -- the cases ---------------------------------------------------------------------------

const design = client(KEYS.design);
const research = client(KEYS.research);
const GENERATIONS = "/v1/images/generations";
const EDITS = "/v1/images/edits";
const RESPONSES = "/v1/responses";
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
const TOOL = { type: "image_generation", model: "gpt-image-2", quality: "low", size: "1024x1024" };

const generation = (id, extra = {}) => ({
  custom_id: id,
  method: "POST",
  url: GENERATIONS,
  body: { ...image, prompt: `A batch line ${id}, from Node`, ...extra },
});
const response = (id) => ({
  custom_id: id,
  method: "POST",
  url: RESPONSES,
  body: {
    model: "gpt-5.5",
    input: `A lighthouse, line ${id}, from Node`,
    tools: [TOOL],
    max_output_tokens: 2000,
    max_tool_calls: 2,
  },
});
const jsonl = (items, name = "lines.jsonl") =>
  toFile(Buffer.from(items.map((item) => JSON.stringify(item) + "\n").join("")), name);

/** Upload `items` as a batch file and create its batch: both answers, with headers. */
async function batchOf(sdk, items, endpoint, extra = {}) {
  const file = await answered(sdk.files.create({ file: await jsonl(items), purpose: "batch" }));
  const created = await answered(
    sdk.batches.create({ input_file_id: file.body.id, endpoint, completion_window: "24h", ...extra }),
  );
  return { file, created };
}

/** A batch run to its end, its output read back and its files as retrieved. */
async function ranToTheEnd(items, endpoint, extra = {}) {
  const made = await batchOf(design, items, endpoint, extra);
  const batch = await ended(design, made.created.body.id);
  const output = await lines(design, batch.output_file_id);
  const outputFile = await answered(design.files.retrieve(batch.output_file_id));
  const input = await lines(design, made.file.body.id);
  return { ...made, ended: batch, output, output_file: outputFile, input };
}

const CASES = {
  generations: async () => {
    // The third line is refused by moderation when it runs: it is in the error file.
    const refusedLine = generation("node-g3", { prompt: "A forbidden line, from Node" });
    const items = [generation("node-g1"), generation("node-g2", { n: 2 }), refusedLine];
    const ran = await ranToTheEnd(items, GENERATIONS, { metadata: { from: "node" } });
    return { ...ran, errors: await lines(design, ran.ended.error_file_id) };
  },
  responses: () => ranToTheEnd([response("node-r1"), response("node-r2")], RESPONSES),
  listed: async () => {
    // Three batches of this team, listed a page of one at a time (`for await` follows
    // `after` from page to page), and its batch files a page of two, oldest first.
    const ids = [];
    for (let i = 0; i < 3; i++) {
      ids.push((await batchOf(design, [generation(`node-l${i}`)], GENERATIONS)).created.body.id);
    }
    const batches = [];
    for await (const batch of design.batches.list({ limit: 1 })) batches.push(batch.id);
    const files = [];
    for await (const file of design.files.list({ limit: 2, order: "asc", purpose: "batch" })) {
      files.push({ id: file.id, purpose: file.purpose });
    }
    const page = await design.batches.list({ limit: 2 });
    const second = page.hasNextPage() ? await page.getNextPage() : null;
    for (const id of ids) await ended(design, id);
    const others = [];
    for await (const batch of research.batches.list({ limit: 100 })) others.push(batch.id);
    return {
      ids,
      batches,
      files,
      first_page: { ids: page.data.map((b) => b.id), has_more: page.has_more },
      second_page: second && { ids: second.data.map((b) => b.id), has_more: second.has_more },
      others,
    };
  },
  cancelled: async () => {
    const made = await batchOf(design, [generation("node-c1"), generation("node-c2")], GENERATIONS);
    const cancelled = await answered(design.batches.cancel(made.created.body.id));
    return { ...made, cancelled, ended: await ended(design, made.created.body.id) };
  },
  files: async () => {
    const vision = await answered(
      design.files.create({ file: await toFile(png(64, 64), "ref.png", { type: "image/png" }), purpose: "vision" }),
    );
    const userData = await answered(
      design.files.create({ file: await toFile(Buffer.from("notes, from Node\n"), "notes.txt"), purpose: "user_data" }),
    );
    const expiring = await answered(
      design.files.create({
        file: await jsonl([generation("node-x1")]),
        purpose: "batch",
        expires_after: { anchor: "created_at", seconds: 3600 },
      }),
    );
    const retrieved = await answered(design.files.retrieve(userData.body.id));
    const visions = [];
    for await (const file of design.files.list({ purpose: "vision" })) visions.push(file.id);
    const waited = await design.files.waitForProcessing(expiring.body.id, { pollInterval: 100 });
    const content = await design.files.content(userData.body.id);
    const text = await content.text();
    const deleted = await answered(design.files.delete(userData.body.id));
    const gone = await refused(design.files.retrieve(userData.body.id));
    const goneAgain = await refused(design.files.delete(userData.body.id));
    return {
      vision,
      user_data: userData,
      expiring,
      retrieved,
      visions,
      waited: waited.status,
      text,
      deleted,
      gone,
      gone_again: goneAgain,
    };
  },
  edit_by_file_id: async () => {
    // The SDK's `images.edit` uploads bytes; an edit of an uploaded file is the JSON body
    // OpenAI documents (`images: [{file_id}]`), sent with the SDK's own `post`.
    const reference = await design.files.create({
      file: await toFile(png(1024, 1024), "ref.png", { type: "image/png" }),
      purpose: "vision",
    });
    const edit = {
      model: "gpt-image-1.5",
      prompt: "Make it dusk, from Node",
      images: [{ file_id: reference.id }],
      quality: "low",
      size: "1024x1024",
    };
    const direct = await answered(design.post("/images/edits", { body: edit }));
    const foreign = await refused(research.post("/images/edits", { body: edit }));
    const made = await batchOf(
      design,
      [{ custom_id: "node-e1", method: "POST", url: EDITS, body: edit }],
      EDITS,
    );
    const batch = await ended(design, made.created.body.id);
    const output = await lines(design, batch.output_file_id);
    const foreignLine = await refused(
      research.files.create({
        file: await jsonl([{ custom_id: "node-e2", method: "POST", url: EDITS, body: edit }]),
        purpose: "batch",
      }),
    );
    return {
      reference: reference.id,
      direct: { ...direct, body: { usage: direct.body.usage, images: direct.body.data.length } },
      foreign,
      ...made,
      ended: batch,
      output,
      foreign_line: foreignLine,
    };
  },
  idempotency: async () => {
    // The SDK sends no Idempotency-Key of its own, and drops its `idempotencyKey` request
    // option (the client names no idempotency header): a team sets the header itself.
    const keyed = client(KEYS.design, { maxRetries: 2 });
    const file = await keyed.files.create({ file: await jsonl([generation("node-i1")]), purpose: "batch" });
    const body = { input_file_id: file.id, endpoint: GENERATIONS, completion_window: "24h" };
    const key = { headers: { "Idempotency-Key": `node-batch-${process.pid}-${Date.now()}` } };
    const first = await answered(keyed.batches.create(body, key));
    const again = await answered(keyed.batches.create(body, key));
    const option = await answered(keyed.batches.create(body, { idempotencyKey: "node-option" }));
    const conflict = await refused(keyed.batches.create({ ...body, metadata: { other: "content" } }, key));
    for (const made of [first, option]) await ended(design, made.body.id);
    return { file: file.id, first, again, option, conflict };
  },
  timed_out: async () => {
    // The SDK's timeout bounds the whole request, and it retries one that ran out (its
    // retry count in `x-stainless-retry-count`, the timeout in `x-stainless-timeout`):
    // the create's retry is a repeat of the first, which made a batch.
    const impatient = client(KEYS.design, { maxRetries: 4 });
    const file = await impatient.files.create({ file: await jsonl([generation("node-t1")]), purpose: "batch" });
    const body = { input_file_id: file.id, endpoint: GENERATIONS, completion_window: "24h" };
    const created = await answered(impatient.batches.create(body, { timeout: 1500 }));
    const batches = [];
    for await (const batch of design.batches.list()) {
      if (batch.input_file_id === file.id) batches.push(batch.id);
    }
    await ended(design, created.body.id);
    return { file: file.id, created, batches };
  },
  refusals: async () => {
    const made = await batchOf(design, [generation("node-f1")], GENERATIONS);
    const fileId = made.file.body.id;
    const batchId = made.created.body.id;
    const done = await ended(design, batchId);
    return {
      unknown_batch: await refused(design.batches.retrieve("batch_0123456789abcdef")),
      unknown_file: await refused(design.files.content("file-0123456789abcdef")),
      others_batch: await refused(research.batches.retrieve(batchId)),
      others_cancel: await refused(research.batches.cancel(batchId)),
      others_content: await refused(research.files.content(done.output_file_id)),
      others_delete: await refused(research.files.delete(fileId)),
      others_create: await refused(
        research.batches.create({ input_file_id: fileId, endpoint: GENERATIONS, completion_window: "24h" }),
      ),
      bad_line: await refused(
        design.files.create({
          file: await jsonl([generation("node-b1"), generation("node-b2", { size: "7x7" })]),
          purpose: "batch",
        }),
      ),
      fine_tune: await refused(
        design.files.create({ file: await jsonl([generation("node-b3")]), purpose: "fine-tune" }),
      ),
      // The SDK checks no required parameter: a JavaScript caller may leave one out.
      no_purpose: await refused(design.files.create({ file: await jsonl([generation("node-b4")]) })),
      no_file: await refused(design.files.create({ purpose: "batch" })),
      wrong_endpoint: await refused(
        design.batches.create({ input_file_id: fileId, endpoint: RESPONSES, completion_window: "24h" }),
      ),
      wrong_window: await refused(
        design.batches.create({ input_file_id: fileId, endpoint: GENERATIONS, completion_window: "48h" }),
      ),
      // Past `limits.files_bytes` (1 MiB in the test's configuration): a file of 4 MiB.
      too_large: await refused(
        design.files.create({
          file: await jsonl(Array.from({ length: 200 }, (_, i) => generation(`node-big-${i}`, { prompt: "x".repeat(20_000) }))),
          purpose: "batch",
        }),
      ),
      list_limit: await refused(design.batches.list({ limit: 0 })),
      list_order: await refused(design.files.list({ order: "sideways" })),
      cancel_ended: await refused(design.batches.cancel(batchId)),
    };
  },
};

const results = {};
for (const name of (process.env.CASES ?? Object.keys(CASES).join(",")).split(",")) {
  const first = sent.length;
  results[name] = { ...(await CASES[name]()), sent: sent.slice(first) };
}
console.log(JSON.stringify(results));
