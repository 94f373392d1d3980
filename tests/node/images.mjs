// The official openai Node SDK using every image door of a running Tollgate as a team
// would: generations (plain, n > 1, streamed), multipart edits (one image, several, a
// mask, streamed, files read from disk), files, batches (listed page by page), and the
// refusals and headers Tollgate adds. Prints one JSON object, a result per case asked
// for, for tests/test_node_images_e2e.py to check against the ledger and the simulator's
// billing.
//
//   TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 \
//   TOLLGATE_KEYS='{"design": "tg_...", "broke": "tg_...", "strict": "tg_..."}' \
//   CASES=generate,edit_stream node images.mjs
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import OpenAI, { toFile } from "openai";

const KEYS = JSON.parse(process.env.TOLLGATE_KEYS);
const HEADERS = [
  "retry-after",
  "x-request-id",
  "x-tollgate-replay-of",
  "x-should-retry",
  "x-tollgate-budget-remaining-usd",
  "x-tollgate-cost-usd",
  "x-tollgate-downgraded",
  "x-tollgate-model",
  "x-tollgate-request-id",
  "x-tollgate-reserved-usd",
  "x-tollgate-team",
];

// What the SDK handed to fetch, each attempt: the multipart fields as the SDK encoded
// them (names in order, files by name, type and size), or the JSON body's keys.
const sent = [];

function client(key, options = {}) {
  return new OpenAI({
    baseURL: process.env.TOLLGATE_BASE_URL,
    apiKey: key,
    maxRetries: 0,
    fetch: async (url, init) => {
      // The SDK's probe of FormData support fetches a `data:` URL: not a request.
      if (String(url).startsWith("http")) {
        sent.push({ url: String(url), method: init.method, ...described(init) });
      }
      return fetch(url, init);
    },
    ...options,
  });
}

function described(init) {
  const headers = new Headers(init.headers);
  const found = {
    retry_count: headers.get("x-stainless-retry-count"),
    idempotency_key: headers.get("idempotency-key"),
  };
  if (init.body instanceof FormData) {
    found.fields = [...init.body.entries()].map(([name, value]) =>
      typeof value === "string"
        ? [name, value]
        : [name, { filename: value.name, type: value.type, size: value.size }],
    );
  }
  return found;
}

// -- real PNGs, made here: 8-bit RGB or RGBA, one colour ------------------------------

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "latin1"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(body));
  return Buffer.concat([length, body, crc]);
}

function png(width, height, alpha = false) {
  const channels = alpha ? 4 : 3;
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, alpha ? 6 : 2, 0, 0, 0], 8);
  const row = Buffer.alloc(1 + width * channels);
  for (let x = 0; x < width; x++) row.set(alpha ? [10, 20, 30, 0] : [10, 20, 30], 1 + x * channels);
  const raw = Buffer.concat(Array.from({ length: height }, () => row));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", header),
    chunk("IDAT", zlib.deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

const pngFile = (name, width, height, options = {}) =>
  toFile(png(width, height, options.alpha), name, options.untyped ? {} : { type: "image/png" });

/** Width and height of each base64 PNG or JPEG answered (from its header). */
function dimensions(b64) {
  const bytes = Buffer.from(b64, "base64");
  if (bytes.subarray(1, 4).toString("latin1") === "PNG") {
    return [bytes.readUInt32BE(16), bytes.readUInt32BE(20)];
  }
  return null;
}

// -- one case: its answer, or its error -------------------------------------------------

function picked(headers) {
  return Object.fromEntries(HEADERS.map((name) => [name, headers?.get(name) ?? null]));
}

function summary(data) {
  return {
    images: (data.data ?? []).map((d) => dimensions(d.b64_json)),
    usage: data.usage ?? null,
    id: data.id ?? null,
    object_status: data.status ?? null,
    purpose: data.purpose ?? null,
  };
}

async function answered(request) {
  const { data, response } = await request.withResponse();
  return { status: response.status, headers: picked(response.headers), ...summary(data) };
}

async function streamed(request, { leaveAfter = Infinity } = {}) {
  const { data: stream, response } = await request.withResponse();
  const events = [];
  for await (const event of stream) {
    // Leaving the loop aborts the request: the client hangs up mid-stream.
    if (events.length >= leaveAfter) break;
    events.push({
      type: event.type,
      partial_image_index: event.partial_image_index ?? null,
      size: event.b64_json ? dimensions(event.b64_json) : null,
      usage: event.usage ?? null,
    });
  }
  return { status: response.status, headers: picked(response.headers), events };
}

/** A stream the upstream breaks off: the events read, then how the SDK failed, if it did. */
async function cutShort(request) {
  const { data: stream, response } = await request.withResponse();
  const events = [];
  try {
    for await (const event of stream) events.push(event.type);
  } catch (error) {
    return {
      headers: picked(response.headers),
      events,
      error: error.constructor.name,
      status: error.status ?? null,
      type: error.type ?? null,
      code: error.code ?? null,
      message: error.message,
    };
  }
  return { headers: picked(response.headers), events, error: null };
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
      headers: picked(error.headers),
    };
  }
  throw new Error("the request was not refused");
}


async function ended(batches, id) {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const batch = await batches.retrieve(id);
    if (["completed", "failed", "expired", "cancelled"].includes(batch.status)) return batch;
    if (Date.now() > deadline) throw new Error(`batch ${id} did not end`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// -- the cases ---------------------------------------------------------------------------

const design = client(KEYS.design);
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
// The SDK's own retries on, as a team's client has them: a refusal must not be retried.
const retrying = { maxRetries: 2 };

async function batchOf(lines, endpoint) {
  const jsonl = lines.map((line) => JSON.stringify(line) + "\n").join("");
  const { data: file, response } = await design.files
    .create({ file: await toFile(Buffer.from(jsonl), "lines.jsonl"), purpose: "batch" })
    .withResponse();
  const created = await answered(
    design.batches.create({ input_file_id: file.id, endpoint, completion_window: "24h" }),
  );
  return { file: { id: file.id, purpose: file.purpose, headers: picked(response.headers) }, created };
}

/** A PNG written to a temporary file, read back by `fs.createReadStream` as a team's
 * script uploads a picture from disk. */
function onDisk(name, width, height, options = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tollgate-node-"));
  const file = path.join(dir, name);
  fs.writeFileSync(file, png(width, height, options.alpha));
  return fs.createReadStream(file);
}

const generationLines = [1, 2].map((i) => ({
  custom_id: `node-${i}`,
  method: "POST",
  url: "/v1/images/generations",
  body: { ...image, prompt: `A batch line ${i}, from Node`, n: i },
}));

const CASES = {
  generate: () => answered(design.images.generate({ ...image, prompt: "A lighthouse, from Node" })),
  generate_n: () =>
    answered(
      design.images.generate({
        ...image,
        prompt: "Two cats, from Node",
        n: 2,
        quality: "medium",
        size: "1536x1024",
      }),
    ),
  generate_default_model: () =>
    answered(design.images.generate({ prompt: "No model named, from Node", quality: "low" })),
  generate_stream: () =>
    streamed(
      design.images.generate({
        ...image,
        prompt: "A harbour at night, streamed from Node",
        stream: true,
        partial_images: 2,
      }),
    ),
  generate_stream_left: () =>
    streamed(
      design.images.generate({
        ...image,
        prompt: "A harbour, left after the first partial, from Node",
        stream: true,
        partial_images: 2,
      }),
      { leaveAfter: 1 },
    ),
  // `[[fault:truncate]]`: the simulator breaks the connection before the completed event.
  generate_stream_cut: () =>
    cutShort(
      design.images.generate({
        ...image,
        prompt: "A harbour [[fault:truncate]], streamed from Node",
        stream: true,
        partial_images: 2,
      }),
    ),
  edit_stream_cut: async () =>
    cutShort(
      design.images.edit({
        ...image,
        prompt: "Make it night [[fault:truncate]], streamed from Node",
        image: await pngFile("in.png", 1024, 1024),
        stream: true,
        partial_images: 1,
      }),
    ),
  edit_one: async () =>
    answered(
      design.images.edit({
        model: "gpt-image-1",
        quality: "low",
        size: "1024x1024",
        input_fidelity: "high",
        prompt: "Add a hat, from Node",
        image: await pngFile("in.png", 1024, 1024),
      }),
    ),
  edit_one_in_a_list: async () =>
    answered(
      design.images.edit({
        ...image,
        prompt: "A list of one, from Node",
        image: [await pngFile("in.png", 512, 512)],
      }),
    ),
  edit_several_and_mask: async () =>
    answered(
      design.images.edit({
        model: "gpt-image-1.5",
        quality: "medium",
        size: "1536x1024",
        prompt: "Merge them, from Node",
        image: [await pngFile("a.png", 1024, 1024), await pngFile("b.png", 1536, 1024)],
        mask: await pngFile("mask.png", 1024, 1024, { alpha: true }),
      }),
    ),
  edit_untyped_file: async () =>
    answered(
      design.images.edit({
        ...image,
        prompt: "A file without a type, from Node",
        image: await pngFile("plain.png", 256, 256, { untyped: true }),
      }),
    ),
  edit_stream_false: async () =>
    answered(
      design.images.edit({
        ...image,
        prompt: "Stream false, from Node",
        image: await pngFile("in.png", 1024, 1024),
        stream: false,
      }),
    ),
  edit_stream: async () =>
    streamed(
      design.images.edit({
        model: "gpt-image-1.5",
        quality: "low",
        size: "1024x1536",
        prompt: "Make it night, streamed from Node",
        image: [await pngFile("a.png", 1024, 1024), await pngFile("b.png", 512, 768)],
        stream: true,
        partial_images: 1,
      }),
    ),
  edit_read_streams: () =>
    answered(
      design.images.edit({
        model: "gpt-image-1.5",
        quality: "medium",
        size: "1536x1024",
        prompt: "Merge them, from Node", // the same bytes as edit_several_and_mask
        image: [onDisk("a.png", 1024, 1024), onDisk("b.png", 1536, 1024)],
        mask: onDisk("mask.png", 1024, 1024, { alpha: true }),
      }),
    ),
  edit_read_stream_streamed: () =>
    streamed(
      design.images.edit({
        ...image,
        prompt: "Make it night, from a file on disk, streamed from Node",
        image: onDisk("in.png", 1024, 1024),
        stream: true,
        partial_images: 1,
      }),
    ),
  refusals: async () => ({
    invalid_size: await refused(design.images.generate({ ...image, size: "1000x1000", prompt: "x" })),
    no_prompt: await refused(design.images.generate({ ...image })),
    unpriced: await refused(design.images.generate({ ...image, model: "gpt-image-9", prompt: "x" })),
    unknown_key: await refused(client("tg_not_a_key", retrying).images.generate({ ...image, prompt: "x" })),
    not_proxied: await refused(design.models.list()),
    too_large: await refused(design.images.generate({ ...image, prompt: "x".repeat(1 << 20) })),
  }),
  variation: async () =>
    answered(
      design.images.createVariation({
        model: "dall-e-2",
        image: await pngFile("in.png", 256, 256),
        n: 2,
        size: "256x256",
        response_format: "b64_json", // DALL·E answers URLs unless asked
      }),
    ),
  file_vision: async () =>
    answered(design.files.create({ file: await pngFile("ref.png", 64, 64), purpose: "vision" })),
  batch_completed: async () => {
    const made = await batchOf(generationLines, "/v1/images/generations");
    const batch = await ended(design.batches, made.created.id);
    const output = batch.output_file_id
      ? (await (await design.files.content(batch.output_file_id)).text())
          .split("\n")
          .filter(Boolean)
          .map((line) => JSON.parse(line))
          .map((line) => ({ custom_id: line.custom_id, usage: line.response.body.usage }))
      : [];
    return { ...made, ended: batch, output };
  },
  batch_listed: async () => {
    // Three batches of this team, listed a page of one at a time, and its files a page of
    // two: `for await` follows `after` from page to page.
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push((await batchOf([generationLines[0]], "/v1/images/generations")).created.id);
    const batches = [];
    for await (const batch of design.batches.list({ limit: 1 })) batches.push(batch.id);
    const files = [];
    for await (const file of design.files.list({ limit: 2 })) files.push(file.id);
    const first = await design.files.list({ limit: 1 });
    const waited = await design.files.waitForProcessing(first.data[0].id);
    const deleted = await design.files.delete(first.data[0].id);
    const gone = await refused(design.files.retrieve(first.data[0].id));
    for (const id of ids) await ended(design.batches, id);
    return { ids, batches, files, waited: waited.status, deleted, gone };
  },
  batch_cancelled: async () => {
    const made = await batchOf(generationLines, "/v1/images/generations");
    const cancelled = await answered(design.batches.cancel(made.created.id));
    const retrieved = await answered(design.batches.retrieve(made.created.id));
    return { ...made, cancelled, retrieved, ended: await ended(design.batches, made.created.id) };
  },
  budget_exceeded: () =>
    refused(
      client(KEYS.broke, retrying).images.generate({ ...image, prompt: "Too dear, from Node" }),
    ),
  budget_exceeded_stream: async () =>
    refused(
      client(KEYS.broke, retrying).images.edit({
        ...image,
        prompt: "Too dear, streamed from Node",
        image: await pngFile("in.png", 1024, 1024),
        stream: true,
        partial_images: 1,
      }),
    ),
  budget_exceeded_batch: async () => {
    const broke = client(KEYS.broke, retrying);
    const file = await broke.files.create({
      file: await toFile(Buffer.from(JSON.stringify(generationLines[0]) + "\n"), "lines.jsonl"),
      purpose: "batch",
    });
    return refused(
      broke.batches.create({
        input_file_id: file.id,
        endpoint: "/v1/images/generations",
        completion_window: "24h",
      }),
    );
  },
  rate_limited: async () => {
    // A day's limit of one request: the first is answered, the second refused until
    // tomorrow, longer than any client should wait.
    const limited = client(KEYS.limited, retrying);
    const first = await answered(
      limited.images.generate({ ...image, prompt: "The one request of the day, from Node" }),
    );
    const second = await refused(
      limited.images.generate({ ...image, prompt: "One too many, from Node" }),
    );
    return { first, second };
  },
  idempotency_key: async () => {
    // The Node SDK sends no Idempotency-Key of its own: a team may set one.
    const key = { headers: { "Idempotency-Key": `node-${process.pid}-${Date.now()}` } };
    const keyed = client(KEYS.design, retrying);
    const ask = (prompt) => keyed.images.generate({ ...image, prompt }, key);
    return {
      first: await answered(ask("A keyed lighthouse, from Node")),
      again: await answered(ask("A keyed lighthouse, from Node")),
      conflict: await refused(ask("Another picture under the same key, from Node")),
    };
  },
  policy: () =>
    refused(
      client(KEYS.strict, retrying).images.generate({
        ...image,
        model: "gpt-image-1",
        prompt: "A model not allowed, from Node",
      }),
    ),
  downgraded: () =>
    answered(
      client(KEYS.strict).images.generate({ ...image, quality: "high", prompt: "Clamped, from Node" }),
    ),
  downgraded_stream: async () =>
    streamed(
      client(KEYS.strict).images.edit({
        ...image,
        quality: "high",
        prompt: "Clamped and streamed, from Node",
        image: await pngFile("in.png", 1024, 1024),
        stream: true,
        partial_images: 2,
      }),
    ),
};

const results = {};
for (const name of (process.env.CASES ?? Object.keys(CASES).join(",")).split(",")) {
  const first = sent.length;
  results[name] = { ...(await CASES[name]()), sent: sent.slice(first) };
}
console.log(JSON.stringify(results));
