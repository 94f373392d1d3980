// The official openai Node SDK on the Responses API door of a running Tollgate, as a
// team's code uses it: a stream read event by event, the `responses.stream()` helper, a
// background response cancelled, a background stream left and resumed, the input items
// paged through, a continuation, a stream the client aborts, a budget refusal and an
// `Idempotency-Key` replay. Prints one JSON object, a result per case asked for, for
// tests/test_node_responses_e2e.py to check against the ledger and the simulator's
// billing.
//
//   TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 \
//   TOLLGATE_KEYS='{"design": "tg_...", "broke": "tg_..."}' \
//   CASES=stream,helper node responses_sdk.mjs
import OpenAI from "openai";

const KEYS = JSON.parse(process.env.TOLLGATE_KEYS);
const TERMINAL = new Set(["completed", "failed", "incomplete", "cancelled"]);
const ask = {
  model: "gpt-5.5",
  tools: [{ type: "image_generation", model: "gpt-image-2", quality: "low", size: "1024x1024" }],
  max_output_tokens: 300,
  max_tool_calls: 1,
};
const streamed = { ...ask, tools: [{ ...ask.tools[0], partial_images: 2 }] };

// What the SDK handed to fetch, each attempt: the method and path, and the retry count.
const sent = [];

function client(key, options = {}) {
  return new OpenAI({
    baseURL: process.env.TOLLGATE_BASE_URL,
    apiKey: key,
    maxRetries: 0,
    fetch: async (url, init) => {
      const headers = new Headers(init.headers);
      sent.push({
        method: init.method,
        path: new URL(url).pathname,
        retry_count: headers.get("x-stainless-retry-count"),
      });
      return fetch(url, init);
    },
    ...options,
  });
}

function tollgateHeaders(headers) {
  return Object.fromEntries([...headers].filter(([name]) => name.startsWith("x-tollgate-")));
}

function counted(types) {
  const found = {};
  for (const type of types) found[type] = (found[type] ?? 0) + 1;
  return found;
}

const design = client(KEYS.design);

const CASES = {
  stream: async () => {
    // `responses.create({stream: true})`, every event iterated.
    const { data: stream, response } = await design.responses
      .create({ ...streamed, input: "A harbour, streamed from Node", stream: true })
      .withResponse();
    const types = [];
    let completed = null;
    for await (const event of stream) {
      types.push(event.type);
      if (event.type === "response.completed") completed = event.response;
    }
    return {
      id: completed.id,
      status: completed.status,
      usage: completed.usage,
      events: counted(types),
      headers: tollgateHeaders(response.headers),
    };
  },
  helper: async () => {
    // `responses.stream()` and its `finalResponse()`.
    const stream = design.responses.stream({ ...streamed, input: "A forest, from the helper" });
    const types = [];
    stream.on("event", (event) => types.push(event.type));
    const final = await stream.finalResponse();
    return {
      id: final.id,
      status: final.status,
      images: final.output.filter((o) => o.type === "image_generation_call").length,
      events: counted(types),
    };
  },
  cancel: async () => {
    // `background: true`, cancelled while queued, then retrieved until it has ended.
    const queued = await design.responses.create({
      ...ask,
      input: "A comet, cancelled from Node",
      background: true,
    });
    const cancelled = await design.responses.cancel(queued.id);
    let found = cancelled;
    const deadline = Date.now() + 60_000;
    while (!TERMINAL.has(found.status)) {
      if (Date.now() > deadline) throw new Error(`${queued.id} did not end within 60 s`);
      await new Promise((resolve) => setTimeout(resolve, 100));
      found = await design.responses.retrieve(queued.id);
    }
    return { id: queued.id, queued: queued.status, status: found.status, usage: found.usage };
  },
  resumed: async () => {
    // `background: true` with `stream: true`: the client reads a few events and leaves,
    // then resumes with `responses.retrieve(id, {stream: true, starting_after})`, as
    // OpenAI's guide to background mode shows.
    const first = await design.responses.create({
      ...streamed,
      input: "A comet, streamed in the background from Node",
      background: true,
      stream: true,
    });
    let id = null;
    const before = [];
    for await (const event of first) {
      before.push(event.sequence_number);
      if (event.type === "response.created") id = event.response.id;
      if (before.length === 3) break;
    }
    const { data: rest, response } = await design.responses
      .retrieve(id, { stream: true, starting_after: before.at(-1) })
      .withResponse();
    const after = [];
    const types = [];
    let completed = null;
    for await (const event of rest) {
      after.push(event.sequence_number);
      types.push(event.type);
      if (event.type === "response.completed") completed = event.response;
    }
    const other = client(KEYS.broke);
    let foreign = null;
    try {
      for await (const event of await other.responses.retrieve(id, { stream: true })) void event;
    } catch (error) {
      foreign = { name: error.constructor.name, status: error.status, code: error.code ?? null };
    }
    return {
      id,
      before,
      after,
      events: counted(types),
      status: completed?.status ?? null,
      headers: tollgateHeaders(response.headers),
      foreign,
    };
  },
  input_items: async () => {
    // `inputItems.list` auto-pagination, a page of one item at a time.
    const input = ["A cat", "on a mat", "from Node"].map((text) => ({ role: "user", content: text }));
    const created = await design.responses.create({ ...ask, input });
    const items = [];
    for await (const item of design.responses.inputItems.list(created.id, {
      limit: 1,
      order: "asc",
    })) {
      items.push(item.content.map((part) => part.text).join(""));
    }
    return { id: created.id, items };
  },
  continued: async () => {
    // `previous_response_id`: the second pays for the first's context again.
    const first = await design.responses.create({ ...ask, input: "A lighthouse, from Node" });
    const second = await design.responses
      .create({ ...ask, input: "Now at night", previous_response_id: first.id })
      .withResponse();
    return {
      first: first.id,
      id: second.data.id,
      status: second.data.status,
      headers: tollgateHeaders(second.response.headers),
    };
  },
  aborted: async () => {
    // An AbortController stops the stream after its first events.
    const controller = new AbortController();
    const stream = await design.responses.create(
      { ...streamed, input: "A river, aborted from Node", stream: true },
      { signal: controller.signal },
    );
    let id = null;
    let events = 0;
    let error = null;
    try {
      for await (const event of stream) {
        events += 1;
        if (event.type === "response.created") id = event.response.id;
        if (events === 3) controller.abort();
      }
    } catch (caught) {
      error = caught.constructor.name;
    }
    return { id, events, error };
  },
  refused: async () => {
    // A budget refusal, from a client that would retry twice what may be retried.
    const broke = client(KEYS.broke, { maxRetries: 2 });
    const first = sent.length;
    try {
      await broke.responses.create({ ...ask, input: "Over budget, from Node" });
      return { refused: false };
    } catch (error) {
      return {
        refused: true,
        name: error.constructor.name,
        status: error.status,
        error: error.error,
        should_retry: error.headers.get("x-should-retry"),
        headers: tollgateHeaders(error.headers),
        attempts: sent.length - first,
      };
    }
  },
  replayed: async () => {
    // The Node SDK sends no Idempotency-Key of its own: a team may set one.
    const key = { headers: { "Idempotency-Key": `node-responses-${process.pid}-${Date.now()}` } };
    const body = { ...streamed, input: "A keyed bridge, from Node", stream: true };
    const attempts = [];
    for (let i = 0; i < 2; i += 1) {
      const { data: stream, response } = await design.responses.create(body, key).withResponse();
      const sequence = [];
      let id = null;
      for await (const event of stream) {
        sequence.push(event.sequence_number);
        if (event.type === "response.completed") id = event.response.id;
      }
      attempts.push({ id, events: sequence.length, sequence, headers: tollgateHeaders(response.headers) });
    }
    return { attempts };
  },
};

const results = {};
for (const name of (process.env.CASES ?? Object.keys(CASES).join(",")).split(",")) {
  results[name] = await CASES[name]();
}
console.log(JSON.stringify(results));
