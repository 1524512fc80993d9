// Compiled (never run) by `npm test`: the StringSight frontend's own calls,
// as written against its seed `lib/api.ts`, must type-check unchanged.
import {
  ApiError,
  checkBackendHealth,
  configure,
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
  listJobs,
  resumeJob,
  type JobMode,
  type ProviderBatch,
} from "../src/index.js";

declare const allRows: Record<string, any>[];
declare function displayProperties(properties: any[]): void;

export async function seedUsage(): Promise<void> {
  configure({ baseUrl: "/api", token: null });
  const { job_id } = await extractJobStart({
    rows: allRows,
    method: "single_model",
    system_prompt: "default",
    task_description: null,
    model_name: "gpt-4o-mini",
    temperature: 0.6,
    top_p: 0.95,
    max_tokens: 2048,
    max_workers: 16,
    chunk_size: 250,
    include_scores_in_prompt: false,
    use_wandb: false,
    output_dir: null,
    sample_size: 10,
  });
  const status = await extractJobStatus(job_id);
  console.log(`Progress: ${status.progress * 100}%`, status.count_done, status.count_total, status.error);
  if (status.state === "done" || status.state === "cancelled") {
    const result = await extractJobResult(job_id);
    if (result.cancelled) console.log(`Job cancelled. Got ${result.count} partial results.`);
    displayProperties(result.properties);
  }
  const cancelResult = await extractJobCancel(job_id);
  const cancelled: { job_id: string; state: string; message: string; properties_count: number } = cancelResult;
  console.log(cancelled.message);
}

export async function typedUsage(): Promise<void> {
  const { job_id } = await extractJobStart(
    { rows: [{ prompt: "What is 2+2?", model: "demo", model_response: [{ role: "assistant", content: "5" }] }] },
    { idempotencyKey: crypto.randomUUID() },
  );
  const detail = await getJob(job_id);
  const outcomes: number = detail.outcomes.done + detail.outcomes.cancelled;
  // Batch mode: the start's mode, the provider's batches and whether results are still to come.
  const batch = await extractJobStart({ rows: allRows, mode: "batch" });
  const mode: JobMode = batch.mode;
  const batches: ProviderBatch[] = (await extractJobStatus(batch.job_id)).provider_batches;
  const completed: number[] = batches.map((each) => each.request_counts.completed);
  const pending: boolean = detail.pending_provider_results;
  const estimate = await estimateJob({ rows: allRows, mode: "batch" });
  const halfPrice: number | null = estimate.cost_usd_by_mode.batch.high;
  console.log(mode, completed, pending, halfPrice, estimate.mode === "online");
  // @ts-expect-error: not a mode
  await extractJobStart({ rows: allRows, mode: "later" });
  const page = await listJobs({ state: "done", model: "gpt-4o-mini", created_after: new Date(), page_size: 10 });
  const states: string[] = page.results.map((job) => job.state);
  for await (const job of iterateJobs({ state: "cancelled" })) console.log(job.job_id, outcomes, states);
  for await (const property of jobProperties(job_id, { pageSize: 100 })) console.log(property.evidence.join());
  const resumed = await resumeJob(job_id, { retryFailed: true });
  console.log(resumed.state);
  const blob: Blob = await (await downloadProperties(job_id, "parquet")).blob();
  console.log(blob.size);
  // @ts-expect-error: not a state
  await listJobs({ state: "finished" });
  // @ts-expect-error: json is pages, not a download
  await downloadProperties(job_id, "json");
  // @ts-expect-error: rows are required
  await extractJobStart({ model_name: "gpt-4o-mini" });
  try {
    await extractJobResult(job_id);
  } catch (error) {
    if (error instanceof ApiError && error.status === 409) console.log(error.detail, error.field);
  }
}

// The frontend's other calls, as its panel makes them.
declare const selectedRow: Record<string, any>;
declare const uploaded: File;

export async function panelUsage(method?: "single_model" | "side_by_side"): Promise<void> {
  const connected: boolean = await checkBackendHealth();
  const { ok } = await health();
  const { prompts } = await getPrompts();
  const choices = prompts.filter((prompt) => prompt.name === "default" || prompt.name === "agent");
  const prefill: string | null | undefined =
    method === "side_by_side" ? choices[0].default_task_description_sbs : choices[0].default_task_description_single;
  const { text } = await getPromptText(choices[0].name, prefill, method);
  const result = await extractSingle({
    row: selectedRow,
    method,
    system_prompt: "default",
    task_description: prefill,
    model_name: "gpt-4o-mini",
    temperature: 0.6,
    top_p: 0.95,
    max_tokens: 2048,
    max_workers: 16,
    use_wandb: false,
    return_debug: true,
  });
  const descriptions: string[] = result.properties.map((property) => property.property_description);
  const rowIndexes: number[] = result.properties.map((property) => property.__index);
  if (result.failures.length > 0) console.log(`Parsing issues detected (${result.failures.length})`);
  const detected = await detectAndValidate(uploaded);
  const columns: string[] = detected.columns;
  console.log(connected, ok, text, descriptions, rowIndexes, columns, detected.valid, detected.method);
  // @ts-expect-error: a method the server does not know
  await getPromptText("default", null, "pairwise");
}
