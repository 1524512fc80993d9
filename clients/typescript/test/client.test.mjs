// The built client (dist/) against a live server:
//   STRINGSIGHT_BASE_URL    e.g. http://127.0.0.1:8000, with a worker running
//   STRINGSIGHT_TOKEN       a user's API token
//   STRINGSIGHT_OTHER_TOKEN another user's token (their jobs must stay hidden)
// Jobs need an LLM slow enough to cancel mid-run (the simulator at 1 s a call).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";

import {
  ApiError,
  checkBackendHealth,
  configure,
  createClient,
  cursorOf,
  deleteJob,
  detectAndValidate,
  downloadProperties,
  estimateJob,
  extractJobCancel,
  extractJobResult,
  extractJobStart,
  extractJobStatus,
  extractSingle,
  getJob,
  getPrompts,
  getPromptText,
  health,
  iterateJobs,
  jobProperties,
  jobPropertiesPage,
  listJobs,
  resumeJob,
} from "../dist/index.js";

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`set ${name} to run the client tests against a live server`);
  return value;
}

const BASE_URL = required("STRINGSIGHT_BASE_URL");
const TOKEN = required("STRINGSIGHT_TOKEN");
const other = createClient({ baseUrl: BASE_URL, token: required("STRINGSIGHT_OTHER_TOKEN") });
configure({ baseUrl: BASE_URL, token: TOKEN });

// Unique text per run, so that no answer comes from the server's cache.
const RUN = randomUUID().slice(0, 8);
const ACTIVE = new Set(["queued", "running"]);

function rows(count, label) {
  return Array.from({ length: count }, (_, index) => ({
    prompt: `${label} ${RUN} #${index}: what is ${index} + ${index}?`,
    model: "demo-model",
    model_response: `It is ${2 * index + 1}, I am quite sure.`,
    question_id: `${label}-${index}`,
  }));
}

const started = [];

async function start(body) {
  const job = await extractJobStart({ use_cache: false, ...body });
  started.push(job.job_id);
  return job;
}

// A job left running would hold the worker for the tests after it.
after(async () => {
  for (const jobId of started) {
    await extractJobCancel(jobId).catch((error) => {
      if (!(error instanceof ApiError)) throw error;
    });
  }
});

async function waitFor(what, check, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await check();
    if (value) return value;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

async function finished(jobId) {
  return waitFor(`job ${jobId} to finish`, async () => {
    const status = await extractJobStatus(jobId);
    return ACTIVE.has(status.state) ? null : status;
  });
}

async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}

async function apiError(promise) {
  const error = await promise.then(
    (value) => assert.fail(`expected an ApiError, got ${JSON.stringify(value)}`),
    (error) => error,
  );
  assert.ok(error instanceof ApiError, `expected an ApiError, got ${error}`);
  return error;
}

describe("a job cancelled mid-run", () => {
  test("start, status, cancel and result keep the seed's flow, with the partial results", async () => {
    const job = await start({ rows: rows(40, "cancel"), max_workers: 2 });
    assert.deepEqual([job.state, job.count_done, job.count_total], ["queued", 0, 40]);

    const seen = [];
    const running = await waitFor("two rows done", async () => {
      const status = await extractJobStatus(job.job_id);
      seen.push(status.count_done);
      return status.count_done >= 2 || !ACTIVE.has(status.state) ? status : null;
    });
    assert.equal(running.state, "running", "the job should still run after 2 of its 40 rows");
    // What a progress bar shows: finished rows (done or failed) over all rows.
    assert.equal(running.progress, (running.count_done + running.count_failed) / running.count_total);
    assert.deepEqual(seen, [...seen].sort((a, b) => a - b), "count_done only climbs");

    const cancel = await extractJobCancel(job.job_id);
    assert.deepEqual([cancel.job_id, cancel.state, cancel.message], [job.job_id, "cancelled", "job cancelled"]);
    assert.ok(cancel.properties_count >= running.properties_count && cancel.properties_count > 0);

    const result = await extractJobResult(job.job_id);
    assert.deepEqual(
      [result.job_id, result.state, result.cancelled, result.count, result.properties.length],
      [job.job_id, "cancelled", true, cancel.properties_count, cancel.properties_count],
    );

    const again = await extractJobCancel(job.job_id);
    assert.deepEqual(
      [again.state, again.message, again.properties_count],
      ["cancelled", "job was already cancelled", cancel.properties_count],
    );

    const detail = await getJob(job.job_id);
    const unfinished = 40 - detail.count_done - detail.count_failed;
    assert.deepEqual(detail.outcomes, {
      done: detail.count_done,
      failed: detail.count_failed,
      running: 0,
      pending: 0,
      cancelled: unfinished,
    });
    assert.ok(unfinished > 0, "the cancel came before the last row");
  });

  test("resumeJob runs the unfinished rows to done, keeping the earlier properties", async () => {
    const job = await start({ rows: rows(12, "resume"), max_workers: 2 });
    await waitFor("a row done", async () => (await extractJobStatus(job.job_id)).count_done >= 1);
    const cancel = await extractJobCancel(job.job_id);
    assert.equal(cancel.state, "cancelled");

    const resumed = await resumeJob(job.job_id, { retryFailed: false });

    assert.deepEqual([resumed.job_id, resumed.cancelled_at], [job.job_id, null]);
    assert.ok(ACTIVE.has(resumed.state), `resumed into ${resumed.state}`);
    const done = await finished(job.job_id);
    assert.deepEqual([done.state, done.count_done, done.count_failed, done.progress], ["done", 12, 0, 1]);
    assert.ok(done.properties_count > cancel.properties_count);
    const result = await extractJobResult(job.job_id);
    assert.deepEqual([result.cancelled, result.count], [false, done.properties_count]);
    assert.deepEqual(new Set(result.properties.map((property) => property.row_index)).size, 12);

    const refused = await apiError(resumeJob(job.job_id));
    assert.deepEqual(
      [refused.status, refused.code, refused.detail],
      [409, "conflict", "job already finished (state: done); only retry_failed can run its failed rows again"],
    );
  });
});

describe("a job still running", () => {
  let jobId;
  before(async () => {
    jobId = (await start({ rows: rows(20, "busy"), max_workers: 1 })).job_id;
  });
  after(() => extractJobCancel(jobId));

  test("its result is a 409 ApiError naming the state", async () => {
    const error = await apiError(extractJobResult(jobId));

    assert.deepEqual([error.status, error.code, error.field], [409, "conflict", undefined]);
    assert.match(error.detail, /^job is not finished \(state: (queued|running)\); results are ready once/);
    assert.equal(error.message, error.detail);
    assert.equal(error.name, "ApiError");
  });

  test("deleting or resuming it is a 409 ApiError", async () => {
    const deleting = await apiError(deleteJob(jobId));
    const resuming = await apiError(resumeJob(jobId));

    assert.deepEqual([deleting.status, deleting.code], [409, "conflict"]);
    assert.match(deleting.detail, /^job is still (queued|running); cancel it before deleting it$/);
    assert.deepEqual([resuming.status, resuming.code], [409, "conflict"]);
    assert.match(resuming.detail, /^job is still (queued|running); cancel it before resuming$/);
  });
});

describe("bad input", () => {
  test("a row without model_response is a 400 ApiError on rows[0]", async () => {
    const error = await apiError(extractJobStart({ rows: [{ prompt: "What is 2+2?", model: "demo" }] }));

    assert.deepEqual([error.status, error.code, error.field], [400, "invalid", "rows[0]"]);
    assert.match(error.detail, /^rows\[0\]: .*model_response/);
    assert.deepEqual(Object.keys(error.errors), ["rows[0]"]);
  });

  test("an unknown state filter, job id or download format is a 400 ApiError naming it", async () => {
    const state = await apiError(listJobs({ state: "finished" }));
    const jobId = await apiError(extractJobStatus("not-a-uuid"));
    const format = await apiError(downloadProperties(randomUUID(), "xml"));

    assert.deepEqual([state.status, state.field], [400, "state"]);
    assert.deepEqual([jobId.status, jobId.field, jobId.detail], [
      400,
      "job_id",
      "job_id: 'not-a-uuid' is not a valid job id (expected a UUID)",
    ]);
    assert.deepEqual([format.status, format.field], [400, "format"]);
  });

  test("an unknown mode is a 400 ApiError naming mode, and an estimate gives both modes' cost", async () => {
    const error = await apiError(extractJobStart({ rows: rows(1, "mode"), mode: "later" }));
    const estimate = await estimateJob({ rows: rows(2, "mode"), model_name: "gpt-4o-mini", mode: "batch" });

    assert.deepEqual([error.status, error.field, error.detail], [
      400,
      "mode",
      "mode: 'later' is not a mode; use one of online, batch",
    ]);
    assert.equal(estimate.mode, "batch");
    assert.deepEqual(estimate.cost_usd, estimate.cost_usd_by_mode.batch);
    assert.ok(estimate.cost_usd_by_mode.batch.high < estimate.cost_usd_by_mode.online.high);
  });

  test("a wrong token is a 401 ApiError", async () => {
    const stranger = createClient({ baseUrl: BASE_URL, token: "0".repeat(40) });

    const error = await apiError(stranger.listJobs());

    assert.deepEqual([error.status, error.detail], [401, "Invalid token."]);
  });
});

describe("a start sent again with its idempotencyKey", () => {
  test("answers with the job the key started; another body with that key is a 409 ApiError", async () => {
    const key = randomUUID();
    const body = { rows: rows(2, "retried"), max_workers: 1, use_cache: false };
    const first = await extractJobStart(body, { idempotencyKey: key });
    started.push(first.job_id);

    const again = await extractJobStart(body, { idempotencyKey: key });
    const other = await apiError(extractJobStart({ ...body, max_workers: 2 }, { idempotencyKey: key }));

    assert.deepEqual(again, first);
    assert.deepEqual([other.status, other.code], [409, "conflict"]);
    assert.match(other.detail, /^Idempotency-Key: this key started a job with a different request/);
  });
});

describe("listing jobs", () => {
  const model = "gpt-4.1"; // no other test starts jobs with this model
  let jobs;
  before(async () => {
    jobs = [];
    for (const label of ["list-a", "list-b", "list-c"]) {
      const job = await start({ rows: rows(5, label), model_name: model, max_workers: 1 });
      assert.equal((await extractJobCancel(job.job_id)).state, "cancelled");
      jobs.push(job);
    }
  });

  test("listJobs returns one page, newest first, with a cursor to the next", async () => {
    const filters = { model, created_after: jobs[0].created_at, page_size: 2 };

    const first = await listJobs(filters);
    const second = await listJobs({ ...filters, cursor: cursorOf(first.next) });

    assert.deepEqual(first.results.map((job) => job.job_id), [jobs[2].job_id, jobs[1].job_id]);
    assert.deepEqual(
      first.results.map((job) => [job.model_name, job.state]),
      [[model, "cancelled"], [model, "cancelled"]],
    );
    assert.deepEqual([second.results.map((job) => job.job_id), second.next], [[jobs[0].job_id], null]);
  });

  test("iterateJobs follows every page and applies each filter", async () => {
    const ids = (list) => list.map((job) => job.job_id);
    const since = { model, created_after: new Date(jobs[0].created_at), page_size: 1 };

    assert.deepEqual(ids(await collect(iterateJobs(since))), ids(jobs).reverse());
    assert.deepEqual(ids(await collect(iterateJobs({ ...since, state: "cancelled" }))), ids(jobs).reverse());
    assert.deepEqual(await collect(iterateJobs({ ...since, state: "done" })), []);
    assert.deepEqual(ids(await collect(iterateJobs({ ...since, created_before: jobs[1].created_at }))), [
      jobs[0].job_id,
    ]);
    assert.deepEqual(await collect(other.iterateJobs({ model, created_after: jobs[0].created_at })), []);
  });
});

describe("a finished job", () => {
  let job;
  let done;
  before(async () => {
    job = await start({ rows: rows(6, "done"), max_workers: 3 });
    done = await finished(job.job_id);
    assert.equal(done.state, "done");
  });

  test("getJob reports every row's outcome", async () => {
    const detail = await getJob(job.job_id);

    assert.deepEqual(
      [detail.job_id, detail.state, detail.count_total, detail.properties_count],
      [job.job_id, "done", 6, done.properties_count],
    );
    assert.deepEqual(detail.outcomes, { done: 6, failed: 0, running: 0, pending: 0, cancelled: 0 });
    assert.deepEqual([detail.rows_per_second, detail.eta_seconds], [null, null]);
    // An online job (the default mode): no provider batch, nothing pending there.
    assert.deepEqual(
      [detail.mode, detail.provider_batches, detail.pending_provider_results],
      ["online", [], false],
    );
  });

  test("jobProperties iterates every property in input order, a page at a time", async () => {
    const result = await extractJobResult(job.job_id);

    const page = await jobPropertiesPage(job.job_id, { pageSize: 4 });
    const properties = await collect(jobProperties(job.job_id, { pageSize: 4 }));

    assert.ok(done.properties_count > 4, "more than one page");
    assert.deepEqual([page.results.length, cursorOf(page.next) !== null], [4, true]);
    assert.equal(properties.length, done.properties_count);
    assert.deepEqual(
      properties.map((property) => property.id),
      result.properties.map((property) => property.id),
    );
  });

  test("downloadProperties gives JSONL with one line per property, CSV and Parquet", async () => {
    const jsonl = await downloadProperties(job.job_id, "jsonl");
    const csv = await downloadProperties(job.job_id, "csv");
    const parquet = await downloadProperties(job.job_id, "parquet");

    assert.equal(jsonl.headers.get("content-type"), "application/x-ndjson");
    const lines = (await jsonl.text()).split("\n").filter(Boolean);
    assert.equal(lines.length, done.properties_count);
    assert.deepEqual(new Set(lines.map((line) => JSON.parse(line).job_id)), new Set([job.job_id]));
    const header = (await csv.text()).split("\n")[0];
    assert.equal(header.split(",").slice(0, 3).join(","), "id,job_id,row_index");
    const bytes = new Uint8Array(await (await parquet.blob()).arrayBuffer());
    assert.equal(new TextDecoder().decode(bytes.slice(0, 4)), "PAR1");
  });

  test("cancelling it answers its final state, sent as the seed sends it (fetch injected)", async () => {
    const sent = [];
    const recording = createClient({
      baseUrl: `${BASE_URL}/`,
      token: TOKEN,
      fetch: (url, init) => {
        sent.push({ url, method: init.method, headers: init.headers, body: init.body });
        return fetch(url, init);
      },
    });

    const cancel = await recording.extractJobCancel(job.job_id);
    await recording.extractJobStatus(job.job_id);

    assert.deepEqual(cancel, {
      job_id: job.job_id,
      state: "done",
      message: "job had already finished (state: done); nothing was cancelled",
      properties_count: done.properties_count,
    });
    assert.deepEqual(
      sent.map(({ url, method, body }) => [url, method, body]),
      [
        [`${BASE_URL}/extract/jobs/cancel`, "POST", JSON.stringify({ job_id: job.job_id })],
        [`${BASE_URL}/extract/jobs/status?job_id=${job.job_id}`, "GET", undefined],
      ],
    );
    assert.equal(sent[0].headers.Authorization, `Token ${TOKEN}`);
    assert.equal(sent[0].headers["Content-Type"], "application/json");
  });

  test("another user's client gets 404 for it, and it is left as it was", async () => {
    const missing = `job_id: no job ${job.job_id}`;
    const calls = [
      () => other.extractJobStatus(job.job_id),
      () => other.extractJobResult(job.job_id),
      () => other.extractJobCancel(job.job_id),
      () => other.getJob(job.job_id),
      () => other.resumeJob(job.job_id, { retryFailed: true }),
      () => other.deleteJob(job.job_id),
      () => other.downloadProperties(job.job_id, "jsonl"),
    ];

    for (const call of calls) {
      const error = await apiError(call());
      assert.deepEqual([error.status, error.code, error.detail], [404, "not_found", missing]);
    }
    assert.deepEqual(await extractJobStatus(job.job_id), done);
  });

  test("deleteJob removes it: afterwards it is a 404", async () => {
    await deleteJob(job.job_id);

    for (const call of [() => getJob(job.job_id), () => extractJobStatus(job.job_id)]) {
      const error = await apiError(call());
      assert.deepEqual(
        [error.status, error.code, error.detail],
        [404, "not_found", `job_id: no job ${job.job_id}`],
      );
    }
  });
});

describe("the StringSight frontend's other calls", () => {
  test("health and checkBackendHealth say the server is up", async () => {
    assert.deepEqual(await health(), { ok: true });
    assert.equal(await checkBackendHealth(), true);
    const nowhere = createClient({ baseUrl: "http://127.0.0.1:9" });
    assert.equal(await nowhere.checkBackendHealth(), false);
  });

  test("getPrompts lists default and agent, and getPromptText places the task description", async () => {
    const { prompts } = await getPrompts();
    assert.deepEqual(
      prompts.map((prompt) => [prompt.name, prompt.label, prompt.has_task_description, prompt.preview.length]),
      [["default", "Default", true, 180], ["agent", "Agent", true, 180]],
    );

    const agent = prompts[1];
    const sbs = await getPromptText("agent", agent.default_task_description_sbs, "side_by_side");
    const plain = await getPromptText("agent");

    assert.equal(sbs.name, "agent");
    assert.ok(sbs.text.includes(agent.default_task_description_sbs), "the task description, verbatim");
    assert.ok(sbs.text.includes('"model": "Model A" or "Model B"'), "the side-by-side form");
    assert.ok(plain.text.startsWith(agent.preview) && !plain.text.includes(agent.default_task_description_single));
    const unknown = await apiError(getPromptText("defualt"));
    assert.deepEqual(
      [unknown.status, unknown.field, unknown.detail],
      [400, "name", "name: unknown prompt name 'defualt'; known names: default, agent"],
    );
  });

  test("extractSingle extracts the row now, with the frontend's body and its __index", async () => {
    const row = {
      __index: 7,
      question_id: "7",
      prompt: `single ${RUN}: can I change my flight?`,
      model: "demo-model",
      model_response: "Yes. I called get_reservation_details with your booking and moved it to Friday.",
    };

    const result = await extractSingle({
      row,
      method: "single_model",
      system_prompt: "default",
      task_description: "Help airline customers.",
      model_name: "gpt-4o-mini",
      temperature: 0.6,
      top_p: 0.95,
      max_tokens: 2048,
      max_workers: 16,
      return_debug: true,
    });

    assert.ok(result.properties.length >= 3);
    assert.deepEqual(result.counts, { properties: result.properties.length });
    assert.deepEqual([result.failures, result.error, result.debug.cached], [[], null, false]);
    assert.ok(result.debug.total_tokens > 0 && result.debug.raw_answer.length > 0);
    for (const property of result.properties) {
      assert.deepEqual(
        [property.question_id, property.model, property.row_index, property.__index],
        ["7", "demo-model", 7, 7],
      );
    }
    const job = await getJob(result.job_id);
    assert.deepEqual(
      [job.kind, job.state, job.count_done, job.properties_count],
      ["single", "done", 1, result.properties.length],
    );
    const refused = await apiError(extractSingle({ row: { prompt: "p", model: "m" }, method: "single_model" }));
    assert.deepEqual([refused.status, refused.field], [400, "row.model_response"]);
  });

  test("detectAndValidate reads an uploaded file", async () => {
    const lines = rows(3, "detect").map((row) => JSON.stringify(row)).join("\n");

    const detected = await detectAndValidate(new Blob([lines]), "rows.jsonl");

    assert.deepEqual(
      [detected.method, detected.valid, detected.missing, detected.row_count, detected.error],
      ["single_model", true, [], 3, null],
    );
    assert.deepEqual(detected.columns, ["prompt", "model", "model_response", "question_id"]);
    assert.deepEqual(detected.preview, rows(3, "detect"));
    const unreadable = await apiError(detectAndValidate(new Blob(["hello"]), "rows.txt"));
    assert.deepEqual([unreadable.status, unreadable.field], [400, "file"]);
  });
});
