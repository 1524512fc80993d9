"""How a worker divides its calls in flight between owners and jobs."""

from jobs.worker.shares import Demand, max_min_fair, owner_then_job_shares


def test_max_min_fair_gives_what_one_cannot_use_to_the_others():
    assert max_min_fair(10, {"a": 2, "b": 10, "c": 10}) == {"a": 2, "b": 4, "c": 4}


def test_max_min_fair_never_gives_more_than_is_wanted():
    assert max_min_fair(64, {"a": 4, "b": 8}) == {"a": 4, "b": 8}


def test_max_min_fair_gives_units_that_do_not_divide_to_the_lowest_rank():
    ranks = {"late": 2, "early": 1, "middle": 1.5}
    assert max_min_fair(5, {"late": 9, "early": 9, "middle": 9}, rank=ranks.__getitem__) == {
        "early": 2,
        "middle": 2,
        "late": 1,
    }


def test_max_min_fair_with_less_capacity_than_wanters_serves_the_lowest_ranks():
    assert max_min_fair(2, {"c": 5, "a": 5, "b": 5}) == {"a": 1, "b": 1, "c": 0}


def test_max_min_fair_of_nothing_wanted_is_nothing():
    assert max_min_fair(8, {"a": 0}) == {"a": 0}


def test_owners_share_first_then_their_jobs():
    demands = [
        Demand(job="a1", owner="alice", wants=64, rank=(1,)),
        Demand(job="a2", owner="alice", wants=64, rank=(2,)),
        Demand(job="a3", owner="alice", wants=64, rank=(3,)),
        Demand(job="b1", owner="bob", wants=64, rank=(4,)),
    ]
    assert owner_then_job_shares(12, demands) == {"a1": 2, "a2": 2, "a3": 2, "b1": 6}


def test_an_owner_limit_caps_the_sum_of_their_jobs_and_frees_the_rest():
    demands = [
        Demand(job="a1", owner="alice", wants=8, rank=(1,)),
        Demand(job="a2", owner="alice", wants=8, rank=(2,)),
        Demand(job="b1", owner="bob", wants=8, rank=(3,)),
    ]
    assert owner_then_job_shares(16, demands, owner_cap=3) == {"a1": 2, "a2": 1, "b1": 3}


def test_a_job_that_wants_little_leaves_its_owners_share_to_their_other_jobs():
    demands = [
        Demand(job="small", owner="alice", wants=1, rank=(1,)),
        Demand(job="big", owner="alice", wants=40, rank=(2,)),
        Demand(job="bob", owner="bob", wants=40, rank=(3,)),
    ]
    assert owner_then_job_shares(20, demands) == {"small": 1, "big": 9, "bob": 10}
