"""How a worker divides its calls in flight among running jobs: between
owners first, then between each owner's jobs, max-min fair at both levels
(nobody gets more than they can use; what one cannot use goes to the
others). Plain functions of plain values."""

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    job: Hashable
    owner: Hashable
    # The most calls in flight the job could use on this worker now.
    wants: int
    # Ties (a unit that cannot be split evenly) go to the lowest rank:
    # the job that started first.
    rank: tuple = ()


def max_min_fair(capacity: int, wants: dict[Hashable, int], rank=None) -> dict[Hashable, int]:
    """Whole units of `capacity` split so that no one gets more than it
    wants and the smallest share is as large as it can be. Units that do
    not divide evenly go to the lowest `rank` first (default: the key)."""
    shares = dict.fromkeys(wants, 0)
    left = capacity
    hungry = sorted((key for key, want in wants.items() if want > 0), key=rank)
    while left > 0 and hungry:
        each, extra = divmod(left, len(hungry))
        for position, key in enumerate(hungry):
            give = min(each + (position < extra), wants[key] - shares[key])
            shares[key] += give
            left -= give
        hungry = [key for key in hungry if shares[key] < wants[key]]
    return shares


def owner_then_job_shares(
    capacity: int, demands: list[Demand], owner_cap: int | None = None
) -> dict[Hashable, int]:
    """Each job's calls in flight: the capacity split between owners (each
    wanting the sum of their jobs' wants, at most `owner_cap`), then each
    owner's share split between their jobs."""
    by_owner: dict[Hashable, list[Demand]] = {}
    for demand in demands:
        by_owner.setdefault(demand.owner, []).append(demand)
    owner_wants = {}
    owner_rank = {}
    for owner, jobs in by_owner.items():
        total = sum(job.wants for job in jobs)
        owner_wants[owner] = total if owner_cap is None else min(total, owner_cap)
        owner_rank[owner] = min(job.rank for job in jobs)
    owner_shares = max_min_fair(capacity, owner_wants, rank=owner_rank.__getitem__)
    shares = {}
    for owner, jobs in by_owner.items():
        ranks = {job.job: job.rank for job in jobs}
        shares.update(
            max_min_fair(owner_shares[owner], {job.job: job.wants for job in jobs}, rank=ranks.__getitem__)
        )
    return shares
