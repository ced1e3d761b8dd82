"""bench/ep_ranks.py's bookkeeping: its table, and the reference it insists on. (Its measurement
compiles both shipped checkpoints, minutes on two cores: `make ep-ranks`; the per-rank counts it
reads are `record().per_rank`, tested in tests/test_record.py and on two real ranks in
tests/distributed/test_parallel.py.)"""

import pytest


@pytest.fixture(scope="module")
def ep_ranks(load_bench):
    return load_bench("ep_ranks")


def row(setting, experts, busiest, idle, agreement):
    return {"batch": 16, "setting": setting, "ranks": 8, "num_experts": 32, "experts_before": 23.0,
            "experts_after": experts, "max_per_rank_before": 4.0, "max_per_rank_after": busiest,
            "idle_ranks_after": idle, "top1_agreement": agreement, "kl": 0.0083}


def test_the_table_names_the_layout_and_one_row_per_setting(ep_ranks):
    result = {"checkpoint": "fine", "ranks": 8, "code_tokens": 1024,
              "rows": [row("none", 23.27, 3.96, 0.06, 1.0), row("moved_mass:ranks=8", 18.82, 3.09, 0.06, 0.933)]}
    table = ep_ranks.markdown(result)
    assert "(32 experts, simulated over 8 expert-parallel ranks of 4)" in table
    assert "| 16 | moved_mass:ranks=8 | 18.82 | 3.09 | 0.06 | 93.3% | 0.0083 |" in table


def test_the_first_setting_must_be_the_reference(ep_ranks):
    with pytest.raises(ValueError, match="first setting must be none"):
        ep_ranks.measure("coarse", 8, [16], ["moved_mass", "none"], 64)
