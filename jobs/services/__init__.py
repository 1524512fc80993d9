"""The rules of a job's life, one responsibility per module.

- lifecycle: start, cancel, resume, delete, fail. The API, admin and CLI
  call only this module (and access) for writes.
- options: what a start may ask for: the caller's values with the defaults
  and rules applied, before anything is stored.
- errors: what a rule raises when it refuses (JobError and its kinds),
  which each interface translates in one place.
- limits: what one user may have at once (active jobs).
- standing: where a job stands: its place in the queue, its calls in flight.
- claims: the worker protocol: claim rows, renew their leases, record results.
- grants: how many LLM calls in flight each worker may have for a job.
- budgets: prices, estimates, job budgets and the daily budget per user.
- recovery: the sweep that repairs what dead workers leave behind.
- access: who may see, change and delete which job.
- idempotency: starts sent again with the same Idempotency-Key.
- throttle: the request rates shared by every web process.
- cache: LLM answers shared by every worker.
- sql: the statements written by hand, for speed, behind named functions.

Every state change is a conditional UPDATE whose row count says who won a
race. Transactions that touch a job lock the job row first and its rows
second, so they never deadlock each other; on SQLite, IMMEDIATE
transactions serialise them outright.
"""
