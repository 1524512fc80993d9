"""Batch mode: a job's rows sent through the provider's Batch API
(/v1/files + /v1/batches) at its batch price, instead of live calls.

- records: what the lifecycle changes on a batch job's batches and rows
  when it is cancelled, fails or resumes (no provider call).
- provider: the Batch API's calls, and the one error that ends a job.
- lines: a row as a request line, and an output or error line as a row's
  outcome, with the online extraction's request building and parsing.
- submit: cache hits at once, then the budget's rows in batches, each
  step recorded before the provider call that creates something.
- poll: on the workers' sweep thread, every STRINGSIGHT_BATCH_POLL_SECONDS:
  the provider's status, cancels asked for, batches a killed worker left.
- importing: a finished batch's lines recorded as online rows are, once.

The online engine never serves a batch job (grants.jobs_to_serve).
"""
