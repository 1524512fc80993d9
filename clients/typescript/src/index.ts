/**
 * A small client for the StringSight Jobs API, with no dependency beyond the
 * platform's `fetch`. Request and response types come from the generated
 * `schema.ts`; `extractJobStart|Status|Result|Cancel`, `getPrompts`,
 * `getPromptText`, `extractSingle`, `detectAndValidate` and
 * `checkBackendHealth` keep the StringSight frontend's own names, paths and
 * arguments.
 */
import type { components, paths } from "./schema.js";

export type { components, operations, paths } from "./schema.js";

type Schemas = components["schemas"];
export type JobState = Schemas["StateEnum"];
export type JobStatus = Schemas["JobStatus"];
export type Property = Schemas["Property"];
/** A property on the StringSight paths: `row_index` and `__index` are the
 * caller's index of its row. */
export type SeedProperty = Schemas["SeedProperty"];
export type PromptInfo = Schemas["PromptInfo"];
export type ErrorBody = Schemas["Error"];
export type Method = Schemas["MethodEnum"];
/** `online` (live calls, the default) or `batch` (the provider's Batch API, at its batch price). */
export type JobMode = Schemas["ModeEnum"];
/** A batch-mode job's batch at the provider: its id, status and request counts. */
export type ProviderBatch = Schemas["ProviderBatch"];

type JsonContent<T> = T extends { content: { "application/json": infer Body } } ? Body : never;
type Ok<Operation> = Operation extends { responses: infer R }
  ? R extends { 200: infer Answer }
    ? JsonContent<Answer>
    : R extends { 201: infer Answer }
      ? JsonContent<Answer>
      : never
  : never;
type RequestJson<Operation> = Operation extends { requestBody?: infer Body }
  ? JsonContent<NonNullable<Body>>
  : never;
type Query<Operation> = Operation extends { parameters: { query?: infer Q } } ? NonNullable<Q> : never;

type StartOperation = paths["/extract/jobs/start"]["post"];
type StartRequest = RequestJson<StartOperation>;
type ListOperation = paths["/api/jobs/"]["get"];
type PropertiesOperation = paths["/api/jobs/{job_id}/properties/"]["get"];
type ResumeOperation = paths["/api/jobs/{job_id}/resume/"]["post"];

/** The body of `extractJobStart`: the schema's request, with rows as loose
 * as the StringSight frontend holds them (the server validates each row). */
export type StartJobBody = Omit<StartRequest, "rows"> & {
  rows: StartRequest["rows"] | Record<string, unknown>[];
  /** Sent by the StringSight frontend; the server ignores it. */
  chunk_size?: number;
  /** Sent by the StringSight frontend; the server ignores it. */
  use_wandb?: boolean;
};
export type StartJobResponse = Ok<StartOperation>;
/** What a start body would cost: rows, cached rows, calls, tokens, USD and seconds. */
export type EstimateResponse = Ok<paths["/api/jobs/estimate/"]["post"]>;
export type StatusResponse = Ok<paths["/extract/jobs/status"]["get"]>;
export type ResultResponse = Ok<paths["/extract/jobs/result"]["get"]>;
export type CancelJobResponse = Ok<paths["/extract/jobs/cancel"]["post"]>;
export type HealthResponse = Ok<paths["/health"]["get"]>;
export type PromptsResponse = Ok<paths["/prompts"]["get"]>;
export type PromptTextResponse = Ok<paths["/prompt-text"]["get"]>;
type SingleOperation = paths["/extract/single"]["post"];
type SingleRequest = RequestJson<SingleOperation>;
/** The body of `extractSingle`, with the row as loose as the frontend holds it. */
export type ExtractSingleBody = Omit<SingleRequest, "row"> & {
  row: Record<string, unknown>;
  /** Sent by the StringSight frontend; the server ignores it. */
  use_wandb?: boolean;
};
export type ExtractSingleResponse = Ok<SingleOperation>;
export type DetectResponse = Ok<paths["/detect-and-validate"]["post"]>;
export type JobPage = Ok<ListOperation>;
export type JobDetail = Ok<paths["/api/jobs/{job_id}/"]["get"]>;
export type ResumeResponse = Ok<ResumeOperation>;
export type PropertyPage = Ok<PropertiesOperation>;

type ListQuery = Query<ListOperation>;
export type JobFilters = Omit<ListQuery, "created_after" | "created_before"> & {
  created_after?: string | Date;
  created_before?: string | Date;
  /** Where a page starts: `cursorOf(page.next)`. */
  cursor?: string;
};
export type DownloadFormat = Exclude<Query<PropertiesOperation>["format"], "json" | undefined>;

export interface ResumeOptions {
  /** Also run the rows that failed (a done job can only be resumed with it). */
  retryFailed?: boolean;
  /** A new cost budget in USD. */
  maxCostUsd?: number | null;
  /** A new token budget. */
  maxTotalTokens?: number | null;
}

export interface StartOptions {
  /** Makes a retried start safe: a start sent again with a key used in the
   * last 24 hours answers with the job that key started (and the answer it
   * got) instead of starting another; with a different body it is a 409
   * ApiError. 1 to 255 characters, e.g. `crypto.randomUUID()`, one per job. */
  idempotencyKey?: string;
}

export interface PageOptions {
  pageSize?: number;
  cursor?: string;
}

type Items<T> = AsyncGenerator<T, void, undefined>;

export interface ClientOptions {
  /** Prefix of every path, e.g. `http://127.0.0.1:8000` or `/api` behind a
   * proxy. Default `""`: the page's own origin. */
  baseUrl?: string;
  /** A DRF token, sent as `Authorization: Token …`. Omit it for a session
   * cookie or the server's anonymous mode. */
  token?: string | null;
  /** Replaces the platform's `fetch` (tests, retries, instrumentation). */
  fetch?: typeof globalThis.fetch;
  /** Sent with every request, e.g. `{"X-CSRFToken": …}` for session writes. */
  headers?: Record<string, string>;
}

/** A non-2xx answer, read from the API's one error shape
 * `{"detail", "code", "field"?, "errors"?}`. */
export class ApiError extends Error {
  override readonly name = "ApiError";
  readonly status: number;
  readonly code: string;
  readonly detail: string;
  /** The failing input, e.g. `rows[0]`, on a validation error. */
  readonly field: string | undefined;
  /** Every failing field with its messages, on a validation error. */
  readonly errors: Record<string, string[]> | undefined;
  /** The parsed error, or the raw text of a body that was not one (a proxy's page). */
  readonly body: ErrorBody | string;

  constructor(status: number, error: ErrorBody, body: ErrorBody | string = error) {
    super(error.detail);
    this.status = status;
    this.code = error.code;
    this.detail = error.detail;
    this.field = error.field;
    this.errors = error.errors;
    this.body = body;
  }
}

async function apiError(response: Response): Promise<ApiError> {
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (isErrorBody(parsed)) return new ApiError(response.status, parsed);
  const detail = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
  return new ApiError(response.status, { detail, code: "error" }, text);
}

function isErrorBody(value: unknown): value is ErrorBody {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as ErrorBody).detail === "string" &&
    typeof (value as ErrorBody).code === "string"
  );
}

type QueryValue = string | number | boolean | Date | null | undefined;

interface SendOptions {
  query?: Record<string, QueryValue>;
  json?: unknown;
  /** A multipart body; fetch sets its Content-Type (with the boundary). */
  form?: FormData;
  accept?: string;
  headers?: Record<string, string>;
}

function queryString(query: Record<string, QueryValue> = {}): string {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value === undefined || value === null) continue;
    params.set(name, value instanceof Date ? value.toISOString() : String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

/** The `cursor` of a page's `next` (or `previous`) link, or null on the last page. */
export function cursorOf(link: string | null | undefined): string | null {
  if (!link) return null;
  return new URL(link, "http://relative.invalid").searchParams.get("cursor");
}

// Each page is asked of our own base URL with the cursor taken from `next`,
// not by following `next` itself: behind a proxy the server's idea of its
// own address is not one the caller can reach.
async function* eachItem<T>(
  fetchPage: (cursor: string | undefined) => Promise<{ next: string | null; results: T[] }>,
): Items<T> {
  let cursor: string | undefined;
  do {
    const page = await fetchPage(cursor);
    yield* page.results;
    cursor = cursorOf(page.next) ?? undefined;
  } while (cursor);
}

function jobPath(jobId: string, rest = ""): string {
  return `/api/jobs/${encodeURIComponent(jobId)}/${rest}`;
}

export interface Client {
  /** `GET /health`: `{ok: true}` while the server answers (no database or worker involved). */
  health(): Promise<HealthResponse>;
  /** The frontend's check: true when `/health` answers 2xx with `ok: true`;
   * false on any failure (it never throws). */
  checkBackendHealth(): Promise<boolean>;
  /** `GET /prompts`: the named prompts (`default`, `agent`) with their labels,
   * a preview and the task description each method starts with. */
  getPrompts(): Promise<PromptsResponse>;
  /** `GET /prompt-text`: a named prompt's full text, with the task
   * description (sent only when not blank) and method applied; exactly what
   * a job started with them sends. An unknown name is a 400 ApiError. */
  getPromptText(name: string, task_description?: string | null, method?: Method): Promise<PromptTextResponse>;
  /** `POST /extract/single`: extract one row now, in the request; recorded as
   * a one-row job (kind `single`). With `return_debug`, the parse failures,
   * raw answer, tokens and cost. */
  extractSingle(body: ExtractSingleBody): Promise<ExtractSingleResponse>;
  /** `POST /detect-and-validate`: upload a file of rows (.jsonl, .json, .csv,
   * .parquet); answers its method, validity, missing columns and a preview. */
  detectAndValidate(file: Blob, filename?: string): Promise<DetectResponse>;
  /** `POST /extract/jobs/start`: start a job; answers its status (state
   * `queued`). With `idempotencyKey`, sending it again is safe. */
  extractJobStart(body: StartJobBody, options?: StartOptions): Promise<StartJobResponse>;
  /** `POST /api/jobs/estimate/`: what `extractJobStart` with this body would
   * cost (tokens, USD, seconds), validated as a start is (same 400s); no
   * job is started and no LLM is called. */
  estimateJob(body: StartJobBody): Promise<EstimateResponse>;
  /** `GET /extract/jobs/status?job_id=`: state, progress and counters. */
  extractJobStatus(jobId: string): Promise<StatusResponse>;
  /** `GET /extract/jobs/result?job_id=`: every property once the job is done,
   * cancelled or error; a 409 ApiError while it is queued or running. */
  extractJobResult(jobId: string): Promise<ResultResponse>;
  /** `POST /extract/jobs/cancel`: cancel at once; `properties_count` is final.
   * A job that had already finished answers its final state (not an error). */
  extractJobCancel(jobId: string): Promise<CancelJobResponse>;
  /** `GET /api/jobs/`: one page of the caller's jobs, newest first. */
  listJobs(filters?: JobFilters): Promise<JobPage>;
  /** Every job matching the filters, page after page. */
  iterateJobs(filters?: Omit<JobFilters, "cursor">): Items<JobStatus>;
  /** `GET /api/jobs/{id}/`: the status with row outcomes, rate and ETA. */
  getJob(jobId: string): Promise<JobDetail>;
  /** `DELETE /api/jobs/{id}/`: delete a finished job (409 while it runs). */
  deleteJob(jobId: string): Promise<void>;
  /** `POST /api/jobs/{id}/resume/`: run a cancelled or failed job's unfinished rows again. */
  resumeJob(jobId: string, options?: ResumeOptions): Promise<ResumeResponse>;
  /** `GET /api/jobs/{id}/properties/`: one page of a job's properties. */
  jobPropertiesPage(jobId: string, options?: PageOptions): Promise<PropertyPage>;
  /** Every property of a job, in input order, page after page. */
  jobProperties(jobId: string, options?: Omit<PageOptions, "cursor">): Items<Property>;
  /** `GET /api/jobs/{id}/properties/?format=`: every property as one file.
   * Read it with `.blob()`, `.arrayBuffer()`, `.text()` or `.body`. */
  downloadProperties(jobId: string, format: DownloadFormat): Promise<Response>;
}

export function createClient(options: ClientOptions = {}): Client {
  const baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
  // Looked up at call time and called unbound: some browsers refuse a
  // `fetch` called as a method of another object.
  const fetchImpl = options.fetch ?? ((input, init) => globalThis.fetch(input, init));

  async function send(method: string, path: string, request: SendOptions = {}): Promise<Response> {
    const { query, json, form, accept = "application/json" } = request;
    const headers: Record<string, string> = { Accept: accept, ...options.headers, ...request.headers };
    if (options.token) headers.Authorization = `Token ${options.token}`;
    if (json !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetchImpl(baseUrl + path + queryString(query), {
      method,
      headers,
      body: form ?? (json === undefined ? undefined : JSON.stringify(json)),
    });
    if (!response.ok) throw await apiError(response);
    return response;
  }

  async function call<T>(...args: Parameters<typeof send>): Promise<T> {
    const response = await send(...args);
    return (await response.json()) as T;
  }

  const client: Client = {
    health: () => call("GET", "/health"),
    async checkBackendHealth() {
      try {
        const body: HealthResponse = await call("GET", "/health");
        return body.ok === true;
      } catch {
        return false;
      }
    },
    getPrompts: () => call("GET", "/prompts"),
    // As the frontend sends them: a blank task description or no method is left out.
    getPromptText: (name, task_description, method) =>
      call("GET", "/prompt-text", { query: { name, task_description: task_description || undefined, method } }),
    extractSingle: (body) => call("POST", "/extract/single", { json: body }),
    detectAndValidate(file, filename) {
      const form = new FormData();
      if (filename === undefined) form.append("file", file);
      else form.append("file", file, filename);
      return call("POST", "/detect-and-validate", { form });
    },
    extractJobStart: (body, { idempotencyKey } = {}) =>
      call("POST", "/extract/jobs/start", {
        json: body,
        headers: idempotencyKey === undefined ? {} : { "Idempotency-Key": idempotencyKey },
      }),
    estimateJob: (body) => call("POST", "/api/jobs/estimate/", { json: body }),
    extractJobStatus: (jobId) => call("GET", "/extract/jobs/status", { query: { job_id: jobId } }),
    extractJobResult: (jobId) => call("GET", "/extract/jobs/result", { query: { job_id: jobId } }),
    extractJobCancel: (jobId) => call("POST", "/extract/jobs/cancel", { json: { job_id: jobId } }),

    listJobs: (filters = {}) => call("GET", "/api/jobs/", { query: { ...filters } }),
    iterateJobs: (filters = {}) => eachItem((cursor) => client.listJobs({ ...filters, cursor })),
    getJob: (jobId) => call("GET", jobPath(jobId)),
    async deleteJob(jobId) {
      await send("DELETE", jobPath(jobId));
    },
    resumeJob(jobId, { retryFailed, maxCostUsd, maxTotalTokens } = {}) {
      const body: RequestJson<ResumeOperation> = {
        retry_failed: retryFailed,
        max_cost_usd: maxCostUsd,
        max_total_tokens: maxTotalTokens,
      };
      return call("POST", jobPath(jobId, "resume/"), { json: body });
    },
    jobPropertiesPage: (jobId, { pageSize, cursor } = {}) =>
      call("GET", jobPath(jobId, "properties/"), { query: { page_size: pageSize, cursor } }),
    jobProperties: (jobId, { pageSize } = {}) =>
      eachItem((cursor) => client.jobPropertiesPage(jobId, { pageSize, cursor })),
    downloadProperties: (jobId, format) =>
      send("GET", jobPath(jobId, "properties/"), { query: { format }, accept: "*/*" }),
  };
  return client;
}

let defaultClient = createClient();

/** Sets the base URL, token and `fetch` of the module-level functions. */
export function configure(options: ClientOptions): void {
  defaultClient = createClient(options);
}

// The module-level functions: each is the default client's method, typed by
// the Client interface so the two cannot drift apart.
export const health: Client["health"] = (...args) => defaultClient.health(...args);
export const checkBackendHealth: Client["checkBackendHealth"] = (...args) => defaultClient.checkBackendHealth(...args);
export const getPrompts: Client["getPrompts"] = (...args) => defaultClient.getPrompts(...args);
export const getPromptText: Client["getPromptText"] = (...args) => defaultClient.getPromptText(...args);
export const extractSingle: Client["extractSingle"] = (...args) => defaultClient.extractSingle(...args);
export const detectAndValidate: Client["detectAndValidate"] = (...args) => defaultClient.detectAndValidate(...args);
export const extractJobStart: Client["extractJobStart"] = (...args) => defaultClient.extractJobStart(...args);
export const estimateJob: Client["estimateJob"] = (...args) => defaultClient.estimateJob(...args);
export const extractJobStatus: Client["extractJobStatus"] = (...args) => defaultClient.extractJobStatus(...args);
export const extractJobResult: Client["extractJobResult"] = (...args) => defaultClient.extractJobResult(...args);
export const extractJobCancel: Client["extractJobCancel"] = (...args) => defaultClient.extractJobCancel(...args);
export const listJobs: Client["listJobs"] = (...args) => defaultClient.listJobs(...args);
export const iterateJobs: Client["iterateJobs"] = (...args) => defaultClient.iterateJobs(...args);
export const getJob: Client["getJob"] = (...args) => defaultClient.getJob(...args);
export const deleteJob: Client["deleteJob"] = (...args) => defaultClient.deleteJob(...args);
export const resumeJob: Client["resumeJob"] = (...args) => defaultClient.resumeJob(...args);
export const jobPropertiesPage: Client["jobPropertiesPage"] = (...args) => defaultClient.jobPropertiesPage(...args);
export const jobProperties: Client["jobProperties"] = (...args) => defaultClient.jobProperties(...args);
export const downloadProperties: Client["downloadProperties"] = (...args) => defaultClient.downloadProperties(...args);
