from mojax.testing import cpu_model, interleaved_timings


def test_every_contender_is_timed_once_first_then_each_round_in_a_rotated_order():
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    timing = interleaved_timings(calls, rounds=3, repeats=2)
    warmup, rounds = log[:6], log[6:]
    assert warmup == ["a", "a", "b", "b", "c", "c"]
    assert rounds == ["a", "b", "c"] * 2 + ["b", "c", "a"] * 2 + ["c", "a", "b"] * 2
    assert set(timing["first_call_s"]) == {"a", "b", "c"}
    assert all(len(medians) == 3 and min(medians) >= 0 for medians in timing["round_medians_s"].values())


def test_the_cpu_model_is_a_non_empty_name():
    name = cpu_model()
    assert isinstance(name, str) and name.strip() == name and name
