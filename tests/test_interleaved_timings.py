import shlex

from mojax.testing import (
    benchmark_command,
    call_orders,
    cpu_description,
    cpu_model,
    cpu_summary,
    interleaved_timings,
)


def test_every_contender_is_timed_once_first_then_each_pass_in_the_seeded_random_orders():
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    timing = interleaved_timings(calls, rounds=3, repeats=2)
    warmup, rounds = log[:6], log[6:]
    assert warmup == ["a", "a", "b", "b", "c", "c"]
    expected = [["abc"[i] for i in order] for r in range(3) for order in call_orders(3, 2, seed=r)]
    assert rounds == [name for order in expected for name in order]
    assert set(timing["first_call_s"]) == {"a", "b", "c"}
    assert all(len(medians) == 3 and min(medians) >= 0 for medians in timing["round_medians_s"].values())


def test_call_orders_are_seeded_permutations_that_vary_every_contenders_predecessor():
    orders = call_orders(6, 40, seed=3)
    assert orders == call_orders(6, 40, seed=3) and orders != call_orders(6, 40, seed=4)
    assert all(sorted(order) == list(range(6)) for order in orders)
    predecessors = {c: {order[i - 1] for order in orders for i in range(1, 6) if order[i] == c} for c in range(6)}
    # a rotated list would give every contender one predecessor; here each follows every other one at some point
    assert all(predecessors[c] == set(range(6)) - {c} for c in range(6))


def test_the_cpu_model_is_a_non_empty_name():
    name = cpu_model()
    assert isinstance(name, str) and name.strip() == name and name


def test_the_cpu_summary_counts_the_cpus_and_names_the_model():
    assert cpu_summary().endswith(f" CPUs ({cpu_model()})") and cpu_summary().split()[0].isdigit()


def _cpuinfo(model: str, family: str, flags: str) -> str:
    """Two processors' entries of a ``/proc/cpuinfo`` text."""
    fields = f"vendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    return "\n".join(f"processor\t: {i}\n{fields}" for i in range(2))


def test_the_cpu_description_names_the_family_and_the_widest_vector_extension():
    assert cpu_description(_cpuinfo("AMD EPYC", "26", "fpu sse avx avx2 fma avx512f avx512bw")) == (
        "AMD EPYC (family 26, AVX-512)"
    )
    assert cpu_description(_cpuinfo("AMD EPYC", "25", "fpu sse avx avx2 fma")) == "AMD EPYC (family 25, AVX2)"
    assert cpu_description(_cpuinfo("Old CPU", "6", "fpu sse sse2")) == "Old CPU (family 6)"


def test_the_cpu_description_keeps_a_bare_model_name_and_needs_one():
    assert cpu_description("model name\t: Some CPU\n") == "Some CPU"
    assert cpu_description("processor\t: 0\nFeatures\t: fp asimd\n") is None


def test_a_benchmark_command_names_the_xla_flags_it_ran_with_and_quotes_every_argument():
    argv = ["--set", "combiner.probe=[last_layer, model.norm]", "--n", "3"]
    plain = benchmark_command("benchmarks/rl_step.py", argv, environ={})
    assert plain == "python benchmarks/rl_step.py --set 'combiner.probe=[last_layer, model.norm]' --n 3"
    assert shlex.split(plain) == ["python", "benchmarks/rl_step.py", *argv]
    assert benchmark_command("benchmarks/rl_step.py", argv, environ={"XLA_FLAGS": ""}) == plain
    flags = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion --xla_cpu_use_onednn=true"
    flagged = benchmark_command("benchmarks/rl_step.py", argv, environ={"XLA_FLAGS": flags})
    assert shlex.split(flagged) == [f"XLA_FLAGS={flags}", "python", "benchmarks/rl_step.py", *argv]
