"""sliderquant sets GOMP_SPINCOUNT=10000 before torch starts OpenMP, unless the user chose a wait setting or
imported torch first (sliderquant/openmp_env.py)."""

import os
import subprocess
import sys

from sliderquant.openmp_env import set_default_wait_policy


def _policy_after(code: str, **env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    code += "; import os; print(os.environ.get('GOMP_SPINCOUNT'))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[-1]


def test_importing_sliderquant_first_sets_a_short_spin_before_torch():
    # torch is imported by sliderquant itself, after the spin count was set
    assert _policy_after("import sliderquant, sys; assert 'torch' in sys.modules") == "10000"


def test_a_chosen_setting_is_kept():
    assert _policy_after("import sliderquant", GOMP_SPINCOUNT="5") == "5"
    assert _policy_after("import sliderquant", OMP_WAIT_POLICY="ACTIVE") == "None"


def test_nothing_is_set_once_torch_runs():
    assert _policy_after("import torch, sliderquant") == "None"


def test_the_rule_itself():
    env = {}
    assert set_default_wait_policy(env, {}) and env == {"GOMP_SPINCOUNT": "10000"}
    env = {"OMP_WAIT_POLICY": "active"}
    assert not set_default_wait_policy(env, {}) and env == {"OMP_WAIT_POLICY": "active"}
    env = {"GOMP_SPINCOUNT": "7"}
    assert not set_default_wait_policy(env, {}) and env == {"GOMP_SPINCOUNT": "7"}
    env = {}
    assert not set_default_wait_policy(env, {"torch": object()}) and env == {}
