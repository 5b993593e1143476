"""Training the reward token router (`tandem route train-token`).

Data: Spec-Bench prompts (../shared/data/specbench/question.jsonl). Prompts at line indices
divisible by 4 are held out (they include every prompt `tandem bench ...` picks when it spreads
5, 10, 12, 15, 20 or 30 prompts over the file); the head trains on `limit` prompts spread over
the rest and is measured on a third as many held-out ones.

Labels, per device token: the device model (smollm2-135m) answers each prompt greedily. The
cloud model (gemma3-270m) reads the same prompt (its own chat template) followed by the device's
answer as text, re-tokenised with its own tokenizer, in one forward pass; at every one of its
token boundaries its greedy choice is what it would have said there. A device token starting at
character c with text d is *good* when the cloud's greedy text from the last cloud boundary at
or before c agrees with the answer text up to the end of d (walking on through cloud tokens
that equal the answer's while the cloud's text is shorter); it is *bad* otherwise. This is the
teacher-forced agreement that assist mode needs: would the cloud have said this token here?

Features: the device's final hidden state at the step that chose the token (the input of its
LM head, 576 numbers), log p(token), the entropy and the top probability. The head is one
L2-penalised logistic regression (routing/linear.py; the penalty chosen by cross-validation
over training prompts; the three token features are barely penalised, so the head starts from
what the draft probability knows and the hidden state corrects it): 580 numbers, a few KB in
routing/artifacts/reward_head.npz. The collected tokens are kept in the feature cache
($TANDEM_CACHE_DIR), so refitting does not rerun the models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .metrics import auc
from .query import ARTIFACTS

HELDOUT_EVERY = 4
L2_GRID = (10.0, 100.0, 1000.0, 10000.0)


def default_prompts_path() -> Path:
    return Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "specbench" / "question.jsonl"


def load_specbench(path: str | Path | None = None) -> list[str]:
    p = Path(path) if path else default_prompts_path()
    if not p.exists():
        raise FileNotFoundError(f"Spec-Bench prompts not found at {p}")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(row["turns"][0] if "turns" in row else row["prompt"])
    return out


def spread(items: list, n: int) -> list:
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def label_tokens(device_text_pieces: list[str], cloud_pred_texts: list[str], cloud_tokens_text: list[str],
                 cloud_pred_is_actual: list[bool]) -> list[int | None]:
    """Agreement labels (1 good, 0 bad, None unknown) for device tokens, from text alone.

    device_text_pieces   the text of each device token, in order (their concatenation is the answer)
    cloud_tokens_text    the answer re-tokenised by the cloud tokenizer: the text of each token
    cloud_pred_texts     the text of the cloud's greedy choice at each of its token boundaries
                         (before cloud token j), j = 0..len(cloud_tokens_text) - 1
    cloud_pred_is_actual whether that greedy choice equals cloud token j itself
    """
    answer = "".join(device_text_pieces)
    bounds = [0]
    for t in cloud_tokens_text:
        bounds.append(bounds[-1] + len(t))
    if bounds[-1] != len(answer):
        bounds = bounds[: len(bounds) - 1]  # the cloud's decode is not the answer: trust what matches
    labels: list[int | None] = []
    c = 0
    for d in device_text_pieces:
        end = c + len(d)
        if not d:
            labels.append(None)
            continue
        # the last cloud boundary at or before c
        j = max(i for i, b in enumerate(bounds) if b <= c) if bounds else 0
        label: int | None = None
        while j < len(cloud_pred_texts) and j < len(bounds):
            g = cloud_pred_texts[j]
            s = answer[bounds[j]:end]
            if g.startswith(s):
                label = 1
                break
            if s.startswith(g) and g and cloud_pred_is_actual[j]:
                j += 1  # the cloud agrees with this token of the answer; look at its next one
                continue
            label = 0
            break
        labels.append(label)
        c = end
    return labels


def collect(device, cloud, prompts: list[str], max_new_tokens: int, log: Callable[[str], None]) -> dict:
    """Per device token: features (hidden + token features), label, prompt index."""
    import torch

    from ..local_runtime.sequence import generate_alone
    from .token import HiddenStateTap, token_features

    feats, labels, groups, conf, ent = [], [], [], [], []
    dt, ct = device.tokenizer, cloud.tokenizer
    t0 = time.perf_counter()
    for pi, prompt in enumerate(prompts):
        ids = dt.prompt_tokens(prompt)
        gen = [t for t in generate_alone(device, ids, max_new_tokens)]
        gen = [t for t in gen if t not in dt.special_ids]
        if not gen:
            continue
        with torch.inference_mode(), HiddenStateTap(device) as tap:
            logits = device.model(input_ids=torch.tensor([ids + gen]), use_cache=False).logits[0].float()
            hidden = tap.last.float()
        pieces, prev = [], ""
        for k in range(1, len(gen) + 1):
            text = dt.text(gen[:k])
            pieces.append(text[len(prev):] if text.startswith(prev) and not text.endswith("\ufffd") else "")
            if not text.endswith("\ufffd"):
                prev = text
        answer = "".join(pieces)
        cp = ct.prompt_tokens(prompt)
        cg = ct.encode(answer)
        with torch.inference_mode():
            clog = cloud.model(input_ids=torch.tensor([cp + cg]), use_cache=False).logits[0]
        pred = clog[len(cp) - 1 : len(cp) - 1 + len(cg)].argmax(-1).tolist()
        cloud_text = [ct.decode([t]) for t in cg]
        pred_text = [ct.decode([t]) for t in pred]
        is_actual = [p == a for p, a in zip(pred, cg)]
        lab = label_tokens(pieces, pred_text, cloud_text, is_actual)
        for k, (tok, y) in enumerate(zip(gen, lab)):
            if y is None:
                continue
            row = len(ids) + k - 1  # the row that chose gen[k]
            tf = token_features(logits[row], tok)
            feats.append(np.concatenate([hidden[row].numpy(), tf]).astype(np.float32))
            labels.append(y)
            groups.append(pi)
            conf.append(float(np.exp(tf[0])))
            ent.append(tf[1])
        log(f"  [{pi + 1}/{len(prompts)}] {len(gen)} tokens, agreement {np.mean([y for y in lab if y is not None]):.0%}"
            f" ({time.perf_counter() - t0:.0f} s)")
    return {
        "X": np.array(feats), "y": np.array(labels, dtype=float), "groups": np.array(groups),
        "confidence": np.array(conf), "entropy": np.array(ent),
    }


def assist_tradeoff(scores: np.ndarray, y: np.ndarray, shares=(0.1, 0.2, 0.3, 0.5)) -> dict:
    """Teacher-forced estimate: sending the lowest-scored share of tokens to the cloud, the share
    of tokens that then agree with the cloud (cloud tokens always do)."""
    order = np.argsort(scores, kind="stable")
    out = {}
    for s in shares:
        k = int(round(s * len(y)))
        routed = np.zeros(len(y), dtype=bool)
        routed[order[:k]] = True
        out[f"{s:.2f}"] = float(np.mean(routed | (y == 1)))
    return out


def train_reward_head(
    *,
    prompts_path: str | Path | None = None,
    limit: int = 40,
    max_new_tokens: int = 32,
    device_model: str = "smollm2-135m",
    cloud_model: str = "gemma3-270m",
    out: str | Path | None = None,
    reuse: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    from ..local_runtime.models import load_model
    from .linear import LinearHeads

    out = Path(out) if out else ARTIFACTS
    out.mkdir(parents=True, exist_ok=True)
    allp = load_specbench(prompts_path)
    train_p = spread([p for i, p in enumerate(allp) if i % HELDOUT_EVERY != 0], limit)
    test_p = spread([p for i, p in enumerate(allp) if i % HELDOUT_EVERY == 0], max(8, limit // 3))
    log(f"reward head: {len(train_p)} training prompts, {len(test_p)} held-out prompts (indices divisible by {HELDOUT_EVERY})")
    from .cache import default_cache_dir

    stash = default_cache_dir() / f"reward-tokens-{device_model}-{cloud_model}-{limit}-{max_new_tokens}.npz"
    if reuse and stash.exists():
        with np.load(stash) as z:
            tr = {k[3:]: z[k] for k in z.files if k.startswith("tr_")}
            te = {k[3:]: z[k] for k in z.files if k.startswith("te_")}
        log(f"reusing collected tokens from {stash}")
    else:
        device = load_model(device_model, progress=False)
        cloud = load_model(cloud_model, progress=False)
        log("collecting training tokens")
        tr = collect(device, cloud, train_p, max_new_tokens, log)
        log("collecting held-out tokens")
        te = collect(device, cloud, test_p, max_new_tokens, log)
        stash.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(stash, **{f"tr_{k}": v for k, v in tr.items()}, **{f"te_{k}": v for k, v in te.items()})
    hidden = tr["X"].shape[1] - 3
    penalty = lambda l2: np.concatenate([np.full(hidden, l2), np.full(3, 1e-2)])  # noqa: E731

    # penalty by grouped CV over training prompts
    folds = tr["groups"] % 4
    cv = {}
    for l2 in L2_GRID:
        aucs = []
        for f in range(4):
            m = folds == f
            if m.all() or not m.any():
                continue
            h = LinearHeads.fit(tr["X"][~m], {"agree": tr["y"][~m]}, l2=penalty(l2))
            aucs.append(auc(h.probs(tr["X"][m])[:, 0], tr["y"][m]))
        cv[l2] = float(np.nanmean(aucs))
        log(f"  l2={l2:g}: cross-validated AUC {cv[l2]:.3f}")
    l2 = max(cv, key=lambda k: cv[k])
    head = LinearHeads.fit(tr["X"], {"agree": tr["y"]}, l2=penalty(l2))
    reward = head.probs(te["X"])[:, 0]
    # a default threshold: the score below which about 20% of training tokens fall
    threshold = float(np.quantile(head.probs(tr["X"])[:, 0], 0.2))
    arrays = head.to_arrays()
    arrays.update({
        "meta_model": np.asarray(device_model), "meta_cloud_model": np.asarray(cloud_model),
        "meta_hidden_size": np.asarray(tr["X"].shape[1] - 3), "meta_threshold": np.asarray(threshold),
        "meta_l2": np.asarray(l2),
    })
    path = out / "reward_head.npz"
    np.savez_compressed(path, **arrays)
    report = {
        "train_tokens": int(len(tr["y"])), "heldout_tokens": int(len(te["y"])),
        "train_agreement": float(tr["y"].mean()), "heldout_agreement": float(te["y"].mean()),
        "l2": l2, "cv_auc": {str(k): v for k, v in cv.items()}, "default_threshold": threshold,
        "heldout_auc": {
            "reward": auc(reward, te["y"]),
            "confidence": auc(te["confidence"], te["y"]),
            "entropy": auc(-te["entropy"], te["y"]),
        },
        "heldout_agreement_when_cloud_takes_share": {
            "reward": assist_tradeoff(reward, te["y"]),
            "confidence": assist_tradeoff(te["confidence"], te["y"]),
            "entropy": assist_tradeoff(-te["entropy"], te["y"]),
        },
        "file": path.name,
        "bytes": path.stat().st_size,
    }
    log(json.dumps(report["heldout_auc"]))
    mpath = out / "train_manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    manifest["token_router"] = {"reward": report, "prompts": {"train": len(train_p), "heldout": len(test_p),
                                                              "max_new_tokens": max_new_tokens}}
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    return report


__all__ = ["train_reward_head", "label_tokens", "assist_tradeoff", "load_specbench"]
