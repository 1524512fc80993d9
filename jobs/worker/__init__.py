"""The worker: an engine per django-q2 task serving every running job, its
call pool (no Django) and how it shares its calls between jobs."""
