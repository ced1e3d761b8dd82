"""Per-site calibration: measure each selection setting's fidelity cost and expert saving at
every routing site, and pick per site under an accuracy budget (`procedure.py`: the method,
its cost, its approximation).

    measure.py    teacher-forced decode passes (KL and top-1 agreement: eval/fidelity.py)
    choose.py     one setting per site: most experts saved within the budget (knapsack)
    data.py       default calibration windows (training split of the code corpus)
    procedure.py  the whole procedure, on one compiled graph whose sites' settings are chosen at
                  run time (`lowering/switch_select.py`); writes a plan (`lynx_compile/plan.py`)
"""

from .procedure import calibrate, candidate_settings, plan_table

__all__ = ["calibrate", "candidate_settings", "plan_table"]
