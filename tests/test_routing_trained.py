"""The shipped router artefacts on held-out prompts (slow: they load the sentence encoder or the
device model). Held out: the GSM8K prompts and MMLU domains that routing/data.py sets aside,
which `tandem route train` never reads."""

import json

import numpy as np
import pytest

from tandem.routing.base import get_query_router
from tandem.routing.data import default_data_dir, load_table, split
from tandem.routing.evaluate import spread_sample
from tandem.routing.metrics import route_metrics
from tandem.routing.query import ARTIFACTS

pytestmark = pytest.mark.slow

SHARED = default_data_dir()
needs = pytest.mark.skipif(
    not (SHARED / "gsm8k.csv").exists() or not (ARTIFACTS / "embedding_router.npz").exists(),
    reason="needs ../shared/data/routing and the trained artefacts",
)


@pytest.fixture(scope="module")
def heldout():
    _, gsm = split(load_table(SHARED / "gsm8k.csv"))
    _, mmlu = split(load_table(SHARED / "mmlu"))
    return {"gsm8k": gsm, "mmlu": mmlu.subset(np.isin(np.arange(len(mmlu)), spread_sample(len(mmlu), 600)))}


@pytest.fixture(scope="module")
def embedding_scores(heldout):
    r = get_query_router("embedding")
    out = {name: r.score_many(t.prompts) for name, t in heldout.items()}
    assert r.stats.escalations == 0
    return out


@needs
def test_artefacts_are_small_and_described():
    for f in ARTIFACTS.iterdir():
        assert f.stat().st_size < 2_000_000, f
    manifest = json.loads((ARTIFACTS / "train_manifest.json").read_text())
    assert manifest["split"]["heldout_rows"]["gsm8k"] > 200
    hashes = np.load(ARTIFACTS / "train_prompt_hashes.npy")
    _, held = split(load_table(SHARED / "gsm8k.csv"))
    from tandem.routing.data import prompt_hash

    assert not np.isin(np.array([prompt_hash(p) for p in held.prompts], dtype=np.uint64), hashes).any()


@needs
def test_calibration_hits_the_target_share_on_held_out_prompts(embedding_scores):
    """Thresholds calibrated without labels on one set of prompts send about the target share of
    other prompts of the same workload to the cloud: GSM8K (calibrated on its training prompts,
    applied to the held-out ones) and the held-out MMLU domains (calibrated on every other one of them,
    unlabelled, as a deployment would on its recent traffic; applied to the rest)."""
    from tandem.routing.base import Calibration, RollingCalibration

    router = get_query_router("embedding")
    train, _ = split(load_table(SHARED / "gsm8k.csv"))
    cal = Calibration.from_scores(router.score_many(train.prompts))
    s = embedding_scores["gsm8k"]
    for share in (0.2, 0.5, 0.7):
        got = float(np.mean(s >= cal.threshold_for_share(share)))
        assert got == pytest.approx(share, abs=0.06), (share, got)
    s = embedding_scores["mmlu"]
    roll = RollingCalibration(router.calibration, window=1000, min_scores=100)
    for x in s[::2]:
        roll.observe(x)
    rest = s[1::2]
    for share in (0.2, 0.5, 0.7):
        got = float(np.mean(rest >= roll.threshold_for_share(share)))
        assert got == pytest.approx(share, abs=0.06), (share, got)


@needs
def test_embedding_router_beats_random_on_held_out(embedding_scores, heldout):
    for name, t in heldout.items():
        m = route_metrics(embedding_scores[name], t.weak, t.strong)
        assert m.apgr > 0.5, (name, m)
    m = route_metrics(embedding_scores["gsm8k"], heldout["gsm8k"].weak, heldout["gsm8k"].strong)
    assert m.strong_calls_at_95pct < m.random_strong_calls_at_95pct


@needs
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
