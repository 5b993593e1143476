"""The shipped router artefacts (slow: they load the sentence encoder or the device model):
small, described by the manifest, deterministic, calibrated, and the default router is the one
the grouped cross-validation selected."""

import json

import numpy as np
import pytest

from tandem.routing.base import DEFAULT_QUERY_ROUTER, get_query_router
from tandem.routing.data import default_data_dir, load_table, prompt_hash
from tandem.routing.evaluate import spread_sample
from tandem.routing.query import ARTIFACTS

pytestmark = pytest.mark.slow

SHARED = default_data_dir()
LEARNED = ("embedding", "format", "mf", "knn", "ensemble")
needs_shared = pytest.mark.skipif(not (SHARED / "gsm8k.csv").exists(), reason="needs ../shared/data/routing")


def _manifest() -> dict:
    return json.loads((ARTIFACTS / "train_manifest.json").read_text())


def test_artefacts_are_small_and_described():
    files = {f.name: f.stat().st_size for f in ARTIFACTS.iterdir()}
    for name in LEARNED:
        assert f"{name}_router.npz" in files, "the trained routers ship with the package"
    assert max(files.values()) < 1_500_000 and sum(files.values()) < 3_000_000, files
    learned = _manifest()["learned"]
    assert learned["winner"] == DEFAULT_QUERY_ROUTER, "the default router is the winner of the selection"
    assert set(learned["families"]) == set(LEARNED)
    nested = learned["nested_cv"]["metrics"]
    for name in ("gsm8k", "mmlu"):
        assert nested[name]["apgr"] > nested[name]["random_apgr"]
        assert nested[name]["cpt50"] < nested[name]["random_cpt50"]


@needs_shared
def test_training_prompts_are_recorded():
    hashes = np.load(ARTIFACTS / "train_prompt_hashes.npy")
    gsm = load_table(SHARED / "gsm8k.csv")
    assert np.isin(np.array([prompt_hash(p) for p in gsm.prompts], dtype=np.uint64), hashes).all()


@pytest.mark.parametrize("name", LEARNED + ("random", "length"))
def test_every_router_scores_deterministically(name):
    prompts = ["What is 2 + 2?", "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
               "Which of the following is NOT a prime?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"]
    # keyword arguments build a fresh instance each time
    kwargs = {"random": {"seed": 0}, "length": {"half_at": 500}}.get(name, {"use_cache": False})
    a, b = (get_query_router(name, fail_safe=False, **kwargs) for _ in range(2))
    sa, sb = np.asarray(a.score_many(prompts)), np.asarray(b.score_many(prompts))
    assert np.array_equal(sa, sb) and np.all((sa >= 0) & (sa <= 1))
    assert np.array_equal(sa, np.asarray(a.score_many(prompts)))
    # one at a time: the same up to float rounding (the encoder pads a batch)
    assert [a.score(p) for p in prompts] == pytest.approx(sa.tolist(), abs=1e-6)


@needs_shared
def test_default_router_calibration_carries_over():
    """The shipped calibration (quantiles of out-of-fold scores) sends about the target share of
    the shared prompts to the cloud when applied to the router refitted on all of them. These
    are the router's own training prompts, which it scores further from the middle than prompts
    it never saw (the out-of-fold scores the quantiles come from): for the per-format heads the
    share at 0.2 comes out at 0.27 here, for the pooled heads 0.21. So the tolerance is 8
    points; that the share holds on unseen prompts of a workload is tested on held-out folds
    (test_routing_learned.py), and RollingCalibration follows the traffic where domains move."""
    t = load_table(SHARED / "mmlu")
    g = load_table(SHARED / "gsm8k.csv")
    idx = spread_sample(len(t), 560)
    prompts = [t.prompts[i] for i in idx] + g.prompts[::19]
    r = get_query_router(DEFAULT_QUERY_ROUTER)
    s = r.score_many(prompts)
    assert r.stats.escalations == 0
    for share in (0.2, 0.5):
        assert float(np.mean(s >= r.calibration.threshold_for_share(share))) == pytest.approx(share, abs=0.08)


def test_prefill_router_from_the_engine_matches_its_own_prefill():
    assert (ARTIFACTS / "prefill_router.npz").exists(), "the trained prefill router ships with the package"
    import torch

    from tandem.local_runtime.engine import Engine
    from tandem.routing.signals import prompt_ids

    router = get_query_router("prefill", fail_safe=False)
    prompt = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    ids = prompt_ids(router.lm, prompt)
    engine = Engine(router.lm)
    engine.append(ids)
    with torch.inference_mode():
        rows = engine.compute()
    assert router.score_prefill(rows, ids) == pytest.approx(router.score(prompt), abs=1e-4)
