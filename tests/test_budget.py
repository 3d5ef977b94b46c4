import pytest

from memtune import Budget, BudgetError
from memtune.devices import DEFAULT_CUDA_RESERVE_BYTES, DEVICES


@pytest.mark.parametrize("spec, expected", [
    (12345, 12345),
    ("24GB", 24 * 10**9),
    ("24GiB", 24 * 2**30),
    ("500MB", 500 * 10**6),
    ("500MiB", 500 * 2**20),
    ("1.5GiB", int(1.5 * 2**30)),
    (" 24 gb ", 24 * 10**9),
    ("1000000B", 1_000_000),
    ("2TB", 2 * 10**12),
])
def test_parse_sizes(spec, expected):
    b = Budget.parse(spec, device="cpu")
    assert b.budget_bytes == expected
    assert b.usable_bytes == expected


def test_cuda_budget_subtracts_reserve():
    b = Budget.parse("24GB", device="H100")
    assert b.reserve_bytes == DEFAULT_CUDA_RESERVE_BYTES
    assert b.usable_bytes == 24 * 10**9 - DEFAULT_CUDA_RESERVE_BYTES


def test_percent_of_device_total():
    b = Budget.parse("80%", device="A100-40GB")
    assert b.budget_bytes == int(DEVICES["A100-40GB"].memory_bytes * 0.8)
    assert b.device == "A100-40GB"


def test_cpu_budget_has_no_reserve():
    b = Budget.parse("2GiB", device="cpu")
    assert b.reserve_bytes == 0 and b.usable_bytes == 2 * 2**30


def test_explicit_reserve():
    b = Budget.parse("24GB", device="H100", reserve="512MiB")
    assert b.reserve_bytes == 512 * 2**20


@pytest.mark.parametrize("bad", ["24XB", "GB", "", "-5GB", "24 G B", "abc", 0, -1, 3.5, True, None, "150%", "0%"])
def test_bad_budgets_list_accepted_forms(bad):
    with pytest.raises(BudgetError) as err:
        Budget.parse(bad, device="H100")
    assert "24GiB" in str(err.value) and "80%" in str(err.value)


def test_budget_below_reserve_says_so():
    with pytest.raises(BudgetError, match="reserved for the CUDA context"):
        Budget.parse("500MB", device="H100")


def test_unknown_device_name_is_rejected():
    with pytest.raises(ValueError, match="H100"):
        Budget.parse("80%", device="TPUv9")
