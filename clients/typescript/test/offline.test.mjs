// The built client (dist/) against a fetch of our own: what it sends, and
// the errors it makes of answers that are not the API's. No server needed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ApiError, createClient } from "../dist/index.js";

function recording(answer) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url: String(url), init });
    return answer();
  };
  return { calls, fetch };
}

test("a proxy's error page becomes an ApiError with its text in body", async () => {
  const page = "<html><body>502 Bad Gateway</body></html>";
  const { fetch } = recording(() => new Response(page, { status: 502, statusText: "Bad Gateway" }));
  const client = createClient({ baseUrl: "http://api.invalid", token: "t", fetch });

  const error = await client.extractJobStatus("some-id").then(
    () => assert.fail("a 502 must reject"),
    (caught) => caught,
  );

  assert.ok(error instanceof ApiError);
  assert.deepEqual(
    [error.status, error.code, error.detail, error.message, error.body],
    [502, "error", "HTTP 502 Bad Gateway", "HTTP 502 Bad Gateway", page],
  );
});

test("the token, extra headers and the base URL reach fetch; no token sends no Authorization", async () => {
  const ok = () => Response.json({ job_id: "j", state: "done" });
  const withToken = recording(ok);
  await createClient({
    baseUrl: "http://api.invalid/",
    token: "abc",
    headers: { "X-Trace": "1" },
    fetch: withToken.fetch,
  }).extractJobStatus("j 1");

  const [call] = withToken.calls;
  assert.equal(call.url, "http://api.invalid/extract/jobs/status?job_id=j+1");
  assert.equal(call.init.headers.Authorization, "Token abc");
  assert.equal(call.init.headers["X-Trace"], "1");

  const anonymous = recording(ok);
  await createClient({ baseUrl: "http://api.invalid", token: null, fetch: anonymous.fetch }).extractJobStatus("j");
  assert.equal("Authorization" in anonymous.calls[0].init.headers, false);
});

test("getPromptText leaves out a blank task description and a missing method, as the frontend does", async () => {
  const { calls, fetch } = recording(() => Response.json({ name: "default", text: "…" }));
  const client = createClient({ baseUrl: "/api", fetch });

  await client.getPromptText("default", "Book flights & more", "side_by_side");
  await client.getPromptText("agent", "");
  await client.getPromptText("agent", null);

  assert.deepEqual(
    calls.map((call) => call.url),
    [
      "/api/prompt-text?name=default&task_description=Book+flights+%26+more&method=side_by_side",
      "/api/prompt-text?name=agent",
      "/api/prompt-text?name=agent",
    ],
  );
});

test("checkBackendHealth is false, never an exception, when the server is down or not ok", async () => {
  const answers = [
    () => Promise.reject(new TypeError("fetch failed")),
    () => new Response("<html>502</html>", { status: 502 }),
    () => Response.json({ status: "degraded" }),
    () => Response.json({ ok: true }),
  ];
  const results = [];
  for (const answer of answers) {
    results.push(await createClient({ fetch: recording(answer).fetch }).checkBackendHealth());
  }

  assert.deepEqual(results, [false, false, false, true]);
});

test("detectAndValidate posts the file as multipart field `file`, with no JSON content type", async () => {
  const { calls, fetch } = recording(() => Response.json({ method: null }));

  await createClient({ fetch }).detectAndValidate(new Blob(["{}"]), "rows.json");

  const [call] = calls;
  assert.equal(call.url, "/detect-and-validate");
  assert.equal(call.init.method, "POST");
  assert.equal("Content-Type" in call.init.headers, false);
  const file = call.init.body.get("file");
  assert.deepEqual([file.name, await file.text()], ["rows.json", "{}"]);
});

test("an idempotencyKey is sent as the Idempotency-Key header, and only when given", async () => {
  const ok = () => Response.json({ job_id: "j", state: "queued" }, { status: 201 });
  const sent = recording(ok);
  const client = createClient({ baseUrl: "http://api.invalid", token: "t", fetch: sent.fetch });

  await client.extractJobStart({ rows: [] }, { idempotencyKey: "retry-7" });
  await client.extractJobStart({ rows: [] });

  const [keyed, plain] = sent.calls;
  assert.deepEqual([keyed.url, keyed.init.method], ["http://api.invalid/extract/jobs/start", "POST"]);
  assert.equal(keyed.init.headers["Idempotency-Key"], "retry-7");
  assert.equal(keyed.init.headers.Authorization, "Token t");
  assert.equal("Idempotency-Key" in plain.init.headers, false);
});
